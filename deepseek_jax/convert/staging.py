"""Where a conversion is built before it appears: `.OUT.partial-<pid>` next to OUT, renamed to OUT only
when complete. A process killed mid-way leaves its staging directory; the next conversion into the same
OUT removes those whose process is gone."""

import os
import shutil
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def staging_dir(out: Path) -> Path:
    """A fresh staging directory for OUT, after removing the leftovers of dead conversions into OUT."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    for old in out.parent.glob(prefix + "*"):
        pid = old.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # our own pid's leftover (a reused pid)
    path.mkdir()
    return path
