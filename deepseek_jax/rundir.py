"""What a run directory guarantees besides its checkpoints: one writer at a time, and the tokenizer and
data stream its checkpoints were trained on.

Writer lock: `train` holds `RUN_DIR/.lock` with flock(LOCK_EX | LOCK_NB) for its whole life (with several
processes, process 0 alone). The kernel drops the lock when the process dies, however it dies (SIGKILL
included), so a killed writer never leaves it stuck; the file's text (pid, host, start time, argv) only
describes the holder to the next writer, whose start fails at once. Readers (`eval`, `generate`) take no
lock and write nothing. flock is per host unless the file system forwards it: local disks and NFSv4
(Linux maps flock onto NFS byte-range locks) do; some FUSE / object-store mounts do not (docs/guarantees.md).

Fingerprints: `RUN_DIR/fingerprints.json` records the sha256 of the tokenizer file the run uses and a
fingerprint of its data stream cheap enough for a 100 GB corpus: per file, its path relative to the
source root, its size and the sha256 of its first and last 64 KiB (the built-in demo's records: the
demo's own fingerprint, data/demo_media.py; with data.max_documents, only the files those documents
come from). A resume whose tokenizer or data differ is refused; `eval` and `generate` refuse another
tokenizer (ids would mean other tokens), and `eval` warns about changed data when the source is there
(`generate` reads no corpus). The file is recorded once a start's restore or init succeeded (so a
refused config records nothing): at a run's first start, and at the next start of a run directory
from before fingerprints.
"""

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

from deepseek_jax.config import Config
from deepseek_jax.config.run import DEMO_SOURCE
from deepseek_jax.multihost import on_process_0
from deepseek_jax.tokenizer import DataError

LOCK_FILE = ".lock"
FINGERPRINTS = "fingerprints.json"
EDGE_BYTES = 64 * 1024  # hashed at each end of every data file
MAX_LISTED_FILES = 10_000  # per-file entries kept (to name what changed); the total hash covers all


class WriterLock:
    """The exclusive writer lock of a run directory (module docstring); `acquire` creates the directory."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """None once held; else a description of the holder (the lock is then not held)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            return _describe(holder)
        self._fd = fd
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "argv": sys.argv}
        try:  # only describes the holder to the next writer: a full disk must not keep the lock from its release
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass
        return None

    def release(self) -> None:
        """Unlocks (closing the file does); the file stays, so no waiting writer races on a new inode."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _describe(text: str) -> str:
    """'pid P on host H since T: argv' from the lock file's JSON (written just after the lock was taken)."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} since {info['started']}: {' '.join(info['argv'])}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


# ----------------------------------------------------------------------------------------------
# Fingerprints


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _edges_hash(path: Path, size: int) -> str:
    """sha256 of a file's first and last EDGE_BYTES (the whole file when it is smaller than both)."""
    with open(path, "rb") as f:
        head = f.read(EDGE_BYTES)
        if size > 2 * EDGE_BYTES:
            f.seek(size - EDGE_BYTES)
        return hashlib.sha256(head + f.read(EDGE_BYTES)).hexdigest()


def data_fingerprint(cfg: Config) -> dict:
    """{"source", "sha256", "files": {relative path: "size:hash12"} (up to MAX_LISTED_FILES)}. With
    data.max_documents, of the files holding those documents only: files sorting after them may come and go."""
    from deepseek_jax.data.sources import _files  # lazy: data imports grain

    source = cfg.data.source
    if source == DEMO_SOURCE:  # synthesised from a spec: the demo's own fingerprint names its content
        from deepseek_jax.data.media_records import source_root

        spec = json.loads((Path(source_root(cfg.data, cfg.model)) / "spec.json").read_text())
        return {"source": source, "sha256": spec["fingerprint"], "files": {}}
    root, files = _files(source)
    if cfg.data.max_documents:
        used = _files_read(cfg)
        files = [p for p in files if str(p) in used]
    total, listed = hashlib.sha256(), {}
    for path in files:
        size = path.stat().st_size
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        digest = _edges_hash(path, size)
        total.update(f"{rel}\t{size}\t{digest}\n".encode())
        if len(files) <= MAX_LISTED_FILES:
            listed[rel] = f"{size}:{digest[:12]}"
    return {"source": source, "sha256": total.hexdigest(), "files": listed}


def _files_read(cfg: Config) -> set[str]:
    """The files the data stream reads from under data.max_documents (media records: per split, as listed)."""
    from deepseek_jax.data.sources import SPLITS, _all_documents

    d = cfg.data
    if d.media is None:
        return {ref[0] for ref in _all_documents(d.source, d.format, d.jsonl_field, d.max_documents).refs}
    from deepseek_jax.data.media_records import list_records

    return {ref[0] for split in SPLITS for ref in list_records(d, split, cfg.model).refs}


def fingerprints(cfg: Config, tokenizer_path: str | Path, *, data: bool = True) -> dict:
    """The run's current tokenizer and (`data`) data fingerprints, as fingerprints.json stores them."""
    current = {"tokenizer": {"path": str(tokenizer_path), "sha256": _sha256_file(Path(tokenizer_path))}}
    return {**current, "data": data_fingerprint(cfg)} if data else current


def reader_fingerprints(cfg: Config, tokenizer_path: str | Path, *, data_check: bool) -> dict:
    """What a reader compares: the tokenizer's fingerprint and, with `data_check` (eval), the data's when its
    source is there (a run directory copied to a machine without the corpus still evaluates on another one)."""
    current = fingerprints(cfg, tokenizer_path, data=False)
    if data_check:
        try:
            current["data"] = data_fingerprint(cfg)
        except (DataError, OSError):
            pass
    return current


def write_fingerprints(run_dir: str | Path, current: dict) -> None:
    """Writes RUN_DIR/fingerprints.json atomically (a reader sees the old file or the new one)."""
    path = Path(run_dir) / FINGERPRINTS
    tmp = path.with_name(f"{FINGERPRINTS}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
    os.replace(tmp, path)


REQUIRED = {"tokenizer": ("path", "sha256"), "data": ("source", "sha256")}  # string keys of fingerprints.json


def stored_fingerprints(run_dir: str | Path) -> dict | None:
    """RUN_DIR/fingerprints.json, or None for a run directory written before fingerprints; DataError naming
    the file when it is not what write_fingerprints writes."""
    path = Path(run_dir) / FINGERPRINTS
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError as e:
        stored, problem = None, f"not valid JSON ({e})"
    else:
        problem = _malformed(stored)
    if problem:
        raise DataError(f"{path} is {problem}; delete it to record the current tokenizer and data at the next "
                        "train start")
    return stored


def _malformed(stored) -> str | None:
    """What fingerprints.json lacks ("missing the string tokenizer.sha256"), or None."""
    for section, keys in REQUIRED.items():
        for key in keys:
            value = stored.get(section) if isinstance(stored, dict) else None
            if not isinstance(value, dict) or not isinstance(value.get(key), str):
                return f"missing the string {section}.{key}"
    return None if isinstance(stored["data"].get("files", {}), dict) else "holding a data.files that is no mapping"


def tokenizer_change(run_dir: str | Path, stored: dict, current: dict) -> str | None:
    """What differs between the stored and the current tokenizer, or None."""
    old, new = stored["tokenizer"], current["tokenizer"]
    if old["sha256"] == new["sha256"]:
        return None
    return (f"the tokenizer differs from the one run directory {run_dir} was trained with ({new['path']}: sha256 "
            f"{old['sha256'][:12]} -> {new['sha256'][:12]}; trained with {old['path']}): its ids would mean "
            "other tokens. Restore the original tokenizer file, or train in a new train.run_dir")


def data_change(run_dir: str | Path, stored: dict, current: dict) -> str | None:
    """What differs between the stored and the current data stream (naming files where it can), or None (also
    when `current` has no data fingerprint, or names another source: the config check says so)."""
    old, new = stored["data"], current.get("data")
    if new is None or old["sha256"] == new["sha256"] or _expand(old["source"]) != _expand(new["source"]):
        return None
    a, b = old.get("files", {}), new.get("files", {})
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    which = (f"; {len(changed)} files differ: {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}"
             if changed else "")
    return (f"the data stream of data.source {new['source']!r} differs from the one run directory {run_dir} was "
            f"trained on (fingerprint {old['sha256'][:12]} -> {new['sha256'][:12]}{which})")


def _expand(source: str) -> str:
    return os.path.expanduser(source)  # a source stored as "~/corpus" is the same as "/home/u/corpus"


def check_fingerprints(run_dir: str | Path, current: dict, *, writer: bool) -> str | None:
    """Compares `current` with RUN_DIR/fingerprints.json, if there is one; raises DataError on a difference that
    makes the checkpoints wrong for this run: another tokenizer, or for a writer (resuming) another data stream.
    Returns a warning for the caller to print (a reader's changed data stream), or None."""
    stored = stored_fingerprints(run_dir)
    if stored is None:
        return None
    problem = tokenizer_change(run_dir, stored, current)
    if problem:
        raise DataError(problem)
    problem = data_change(run_dir, stored, current)
    if problem and writer:
        raise DataError(f"{problem}. Resuming would train on another stream than the checkpoints' data position "
                        f"assumes: restore the original files, use a new train.run_dir, or delete "
                        f"{Path(run_dir) / FINGERPRINTS} to accept the change")
    return f"warning: {problem}" if problem else None


def record_fingerprints(run_dir: str | Path, current: dict, *, resuming: bool) -> str | None:
    """Records `current` (a writer, once its checkpoint restored or its state initialised: a config the restore
    refuses records nothing), unless a resumed run directory has them already. Returns a note for the caller to
    print when a run directory from before fingerprints gets them, else None."""
    if resuming and stored_fingerprints(run_dir) is not None:
        return None
    write_fingerprints(run_dir, current)
    if resuming:
        return (f"note: {Path(run_dir) / FINGERPRINTS} recorded now (this run directory predates fingerprints): "
                "its tokenizer and data stream are checked from the next start on")
    return None


# ----------------------------------------------------------------------------------------------
# With several processes: process 0 reads and writes the shared files, every process fails together


def checked_fingerprints(cfg: Config, run_dir: Path, tokenizer_path: str | Path, *, writer: bool, check: bool = True,
                         data_check: bool = True) -> dict | None:
    """The current fingerprints on process 0 (None elsewhere), checked against RUN_DIR's when `check`
    (check_fingerprints; a reader's data only with `data_check`, best-effort), its warning printed."""
    def current():
        fp = (fingerprints(cfg, tokenizer_path) if writer
              else reader_fingerprints(cfg, tokenizer_path, data_check=data_check))
        warning = check_fingerprints(run_dir, fp, writer=writer) if check else None
        if warning:
            print(warning, file=sys.stderr)
        return fp

    return on_process_0(current, DataError("process 0 found the run directory's tokenizer or data changed"))


def record_on_process_0(run_dir: Path, current: dict | None, *, resuming: bool) -> None:
    """record_fingerprints on process 0, its note printed."""
    note = on_process_0(lambda: record_fingerprints(run_dir, current, resuming=resuming),
                        DataError(f"process 0 could not record {Path(run_dir) / FINGERPRINTS}"))
    if note:
        print(note, file=sys.stderr)
