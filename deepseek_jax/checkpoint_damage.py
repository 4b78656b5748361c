"""Damage in a checkpoint step, found without Orbax (`precheck`, so without its barriers) or read out of
the error Orbax raised (`damage_in`); each answer is "FILE: why" or None. Nothing here checksums array bytes:
a data file garbled in place (same size) passes."""

import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import tensorstore as ts


def precheck(step_dir: Path) -> str | None:
    """"FILE: why" when a step directory is visibly damaged, found without Orbax (so without its barriers):
    a file every step has is missing, a JSON file is malformed, or the state's OCDBT database is (_ocdbt_damage);
    None if it looks whole. Array bytes garbled in place pass (nothing checksums them)."""
    for required in ("state/manifest.ocdbt", "config/metadata", "data"):
        if not (step_dir / required).exists():
            return f"{step_dir / required} is missing"
    data = [p for p in (step_dir / "data").iterdir() if p.name != "commit_success.txt"]
    if not data:  # a process layout change leaves other processes' files; none at all is damage
        return f"{step_dir / 'data'} holds no data-iterator state"
    state = step_dir / "state"
    for path in [step_dir / "config" / "metadata", *data, state / "_METADATA", *state.glob("array_metadatas/*")]:
        if not path.is_file():
            continue  # Orbax restores without _METADATA / array_metadatas
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            return f"{path} is not valid JSON ({e})"
    return _ocdbt_damage(state)


def _ocdbt_damage(state_dir: Path) -> str | None:
    """"FILE: why" when the state's OCDBT database cannot be walked, or refers to bytes its files lack. Reads
    the manifest and every b-tree node (tensorstore checks their checksums, so a truncated or garbled one
    fails) and compares each array value's offset + length with its file's size; reads no array bytes."""
    base = ts.KvStore.open(f"file://{state_dir}/").result()
    pending, where = [None], state_dir / "manifest.ocdbt"  # None: the manifest
    while pending:
        location = pending.pop()
        try:
            node = ts.ocdbt.dump(base, location).result()
        except Exception as e:  # noqa: BLE001 (tensorstore's errors: any is damage, named by its file)
            return f"{where if location is None else _ocdbt_file(state_dir, location)[0]}: {_first_line(e)}"
        if location is None:  # the manifest: its newest version's root node, if it has keys
            pending += [v["root"]["location"] for v in node["versions"][-1:] if "location" in v["root"]]
            continue
        for entry in node["entries"]:
            if "location" in entry:  # an interior node's child
                pending.append(entry["location"])
            elif "indirect_value" in entry:
                path, end = _ocdbt_file(state_dir, entry["indirect_value"])
                size = path.stat().st_size if path.is_file() else None
                if size is None or size < end:
                    what = "is missing" if size is None else f"holds {size} bytes, fewer than the {end} it should"
                    return f"{path} (array {entry['key'].decode(errors='replace').split('/')[0]}) {what}"
    return None


def _ocdbt_file(state_dir: Path, reference: str) -> tuple[Path, int]:
    """(file, end offset) of an OCDBT reference "kind:base_path:relative_path:offset:length"."""
    _, base, relative, offset, length = reference.split(":")
    return state_dir / unquote(base) / unquote(relative), int(offset) + int(length)


def _first_line(error: BaseException) -> str:
    return str(error).split(" [tensorstore_spec")[0].splitlines()[0] if str(error) else type(error).__name__


_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
_TENSORSTORE_DAMAGE = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT): ")


def damage_in(error: BaseException, step_dir: Path) -> str | None:
    """"FILE: why" when `error`'s chain says a file of `step_dir` is missing or unreadable (tensorstore
    names the OCDBT database and often the file; a truncated data file only by its new size, matched
    here against the step's files); None for any other failure (out of memory, a bug): that re-raises."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
            return f"{getattr(error, 'filename', None) or step_dir}: {error}"
        text = str(error).split(" [tensorstore_spec")[0]
        files = [f for f in _LOCAL_FILE.findall(text) if f.startswith(str(step_dir))]
        if files and _TENSORSTORE_DAMAGE.match(text):
            path = Path(max(files, key=len))
            size = re.search(r"value of size (\d+)", text)
            if size and path.is_dir():
                same = [f for f in path.rglob("*") if f.is_file() and f.stat().st_size == int(size[1])]
                path = same[0] if len(same) == 1 else path
            array = re.search(r'Error reading "([^"/]+)', text)
            return f"{path}{f' (array {array[1]})' if array else ''}: {text.rsplit(': ', 1)[-1]}"
        error = error.__cause__ or error.__context__
    return None


def drop_aborted_read_noise() -> None:
    """An aborted Orbax restore leaves reads behind whose late failures Python prints as "Exception ignored"
    tracebacks (their coroutines', and "Event loop is closed" from tensorstore's threads), at any later
    moment. The damage is reported by restore_latest: this process drops those two kinds (installed before
    the first restore, so no thread races it) and passes every other one on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_aborted_reads", False):
        return

    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        if "_read_array_index" in repr(obj) or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            return
        previous(unraisable)

    hook.drops_aborted_reads = True
    sys.unraisablehook = hook
