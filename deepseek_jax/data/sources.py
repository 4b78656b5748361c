"""Documents: which texts a data config names, split into train and validation, and samples of them.

`source: stdlib` is every *.py under this Python's stdlib (no site-/dist-packages); otherwise a file,
directory (recursive, hidden files skipped) or glob. Text files are one document each, a .jsonl line
is one (field `jsonl_field`), an .array_record record is one (UTF-8). Blank documents are dropped. A
document is in validation iff the first 64 bits of sha1(its path relative to the source root, plus
line / record index) / 2**64 < val_fraction, so the split does not move when files are added.

Documents are listed once (paths and offsets, no text) and read lazily by index, so Grain can
shuffle and shard them. Fixed samples of the train split feed BPE training (`load_tokenizer`) and
the unigram baseline.
"""

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from deepseek_jax.config import Config, DataConfig
from deepseek_jax.config.run import DEMO_SOURCE
from deepseek_jax.tokenizer import DataError, Tokenizer, count_tokens, load_or_train

BPE_TRAIN_BYTES = 20_000_000  # cap on BPE training text: the stdlib's 31 MB adds little
SPLITS = ("train", "validation")


class Documents(Sequence):
    """Lazy random-access documents; `refs[i]` = (path, format, line byte offset | record index)."""

    def __init__(self, refs: list[tuple[str, str, int]], names: list[str], field: str):
        self.refs, self.names, self.field = refs, names, field
        self._readers: dict = {}

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> str:
        path, fmt, loc = self.refs[i]
        if fmt == "text":
            return Path(path).read_text(encoding="utf-8")
        if fmt == "jsonl":
            with open(path, "rb") as f:
                f.seek(loc)
                return json.loads(f.readline())[self.field]
        if path not in self._readers:
            self._readers[path] = grain.sources.ArrayRecordDataSource([path])
        return self._readers[path][loc].decode("utf-8")

    def __getstate__(self):  # array_record readers are reopened in each worker process
        return {**self.__dict__, "_readers": {}}


def _walk(root: Path, skip_dir) -> list[Path]:
    """Files under root, sorted, pruning directories for which skip_dir(name) holds."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        out += [Path(dirpath, f) for f in filenames]
    return sorted(out)


def _files(source: str) -> tuple[Path, list[Path]]:
    """The source root (document names are relative to it) and its files, sorted."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "__pycache__"}
        return root, [p for p in _walk(root, skip.__contains__) if p.suffix == ".py"]
    path = Path(source).expanduser()
    if glob.has_magic(source):  # the root is the pattern's part before its first wildcard
        magic = next(i for i, part in enumerate(path.parts) if glob.has_magic(part))
        root = Path(*path.parts[:magic]) if magic else Path(".")
        return root, sorted(
            Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file()
        )
    if path.is_dir():  # hidden files and directories (.git, .DS_Store) are not documents
        return path, [
            p for p in _walk(path, lambda d: d.startswith(".")) if not p.name.startswith(".")
        ]
    if path.is_file():
        return path.parent, [path]
    raise DataError(f"data.source {source!r} does not exist")


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return {".jsonl": "jsonl", ".array_record": "array_record"}.get(path.suffix, "text")


def _scan(path: Path, fmt: str, field: str, stdlib: bool):
    """Yields (location, index, text) for each document in one file, with errors naming the file."""
    if fmt == "text":
        try:
            yield -1, None, path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            if not stdlib:  # the stdlib holds a few deliberately broken test files: skip those
                raise DataError(
                    f"{path} is not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None
    elif fmt == "jsonl":
        offset = 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield offset, n, _jsonl_text(line, path, n, field)
                offset += len(line)
    else:
        try:
            records = grain.sources.ArrayRecordDataSource([str(path)])
        except Exception as e:  # noqa: BLE001 (riegeli raises plain RuntimeError/ValueError)
            raise DataError(f"{path} is not an array_record file: {e}") from None
        for i in range(len(records)):
            try:
                yield i, i, records[i].decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path} record {i} is not UTF-8 text") from None


def _jsonl_text(line: bytes, path: Path, n: int, field: str) -> str:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path} line {n} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{path} line {n} has no field {field!r} (data.jsonl_field)")
    if not isinstance(obj[field], str):
        raise DataError(f"{path} line {n}: field {field!r} is {type(obj[field]).__name__}, not str")
    return obj[field]


def _hash_fraction(name: str) -> float:
    """A stable uniform [0, 1) number per document name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


def _all_documents(source: str, fmt: str, field: str, max_documents: int) -> Documents:
    root, files = _files(source)
    stamps = tuple((p, (st := p.stat()).st_mtime_ns, st.st_size) for p in files)  # edits re-scan
    return _scan_files(source, root, stamps, fmt, field, max_documents)


@functools.lru_cache(maxsize=8)
def _scan_files(source: str, root: Path, stamps: tuple, fmt: str, field: str, max_documents: int):
    """All documents of the source; cached since each split and the tokenizer list them again."""
    refs, names = [], []
    files = [p for p, _, _ in stamps]
    for path in files:
        file_fmt = _format(path, fmt)
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        for loc, index, text in _scan(path, file_fmt, field, source == "stdlib"):
            if text.strip():
                refs.append((str(path), file_fmt, loc))
                names.append(rel if index is None else f"{rel}:{index}")
            if max_documents and len(refs) == max_documents:
                return Documents(refs, names, field)
    if not refs:
        what = f"{len(files)} files, all empty" if files else "no files match"
        raise DataError(f"data.source {source!r}: no documents found ({what})")
    return Documents(refs, names, field)


def list_documents(cfg: DataConfig, split: str) -> Documents:
    """The split's documents, in source order (sorted paths, then line / record order)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    docs = _all_documents(cfg.source, cfg.format, cfg.jsonl_field, cfg.max_documents)
    keep = [
        i
        for i, name in enumerate(docs.names)
        if (_hash_fraction(name) < cfg.val_fraction) == (split == "validation")
    ]
    if not keep:
        raise DataError(
            f"the {split} split of data.source {cfg.source!r} is empty: none of its {len(docs)} "
            f"document(s) fall there with data.val_fraction={cfg.val_fraction}; {_empty_split_hint(len(docs))}"
        )
    return Documents([docs.refs[i] for i in keep], [docs.names[i] for i in keep], docs.field)


def _empty_split_hint(n: int) -> str:
    """How to fix an empty split of a text source with n documents."""
    what = ("add documents (a text file is one document; each .jsonl line and .array_record record is one) "
            "or change data.val_fraction")
    return f"{what}; each split needs at least one" if n < 2 else what


def check_splits(cfg: Config, process_count: int = 1) -> None:
    """DataError before any work is spent if a split of `cfg`'s data is empty, or if the validation split
    holds fewer documents (records) than processes: each process evaluates its own share once, while the
    train split repeats, so any train document serves every process. Text listings are cached (_scan_files)."""
    for split in SPLITS:
        items = _texts(cfg.data, split, cfg.model)
        if split == "validation" and len(items) < process_count:
            raise DataError(f"the validation split of data.source {cfg.data.source!r} holds {len(items)} "
                            f"document(s), fewer than the {process_count} processes: each needs one; "
                            f"add documents or raise data.val_fraction (now {cfg.data.val_fraction})")


# ----------------------------------------------------------------------------------------------
# Samples: tokenizer training and the unigram baseline


def load_tokenizer(cfg: DataConfig, run_dir: str | Path, model_vocab_size: int, model=None) -> Tokenizer:
    """`cfg.tokenizer` if given; for `source: demo_media` the demo's own (data/demo_media.py, which
    needs the `model` config); else `run_dir/tokenizer.json`, trained on the train split once."""
    if cfg.source == DEMO_SOURCE and not cfg.tokenizer:
        from deepseek_jax.data.media_records import source_root  # lazy: it imports this module

        cfg = dataclasses.replace(cfg, tokenizer=str(Path(source_root(cfg, model)) / "tokenizer.json"))
    return load_or_train(cfg, run_dir, model_vocab_size, lambda: _bpe_texts(cfg))


def _texts(cfg: DataConfig, split: str, model=None) -> Sequence[str]:
    """The split's documents; for media records (data.media) their text segments, joined per record."""
    if cfg.media is None:
        return list_documents(cfg, split)
    from deepseek_jax.data.media_records import RecordTexts, list_records  # lazy: it imports this module

    return RecordTexts(list_records(cfg, split, model))


def _bpe_texts(cfg: DataConfig):
    total = 0
    for text in _sampled(_texts(cfg, "train")):
        yield text
        total += len(text)
        if total >= BPE_TRAIN_BYTES:
            return


def _sampled(docs: Sequence[str]):  # with `names`: Documents or media_records.RecordTexts
    """Texts in sha1-of-name order: any prefix is a fixed sample across all directories."""
    for i in sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs.names[i].encode()).digest()):
        yield docs[i]


def unigram_baseline(cfg: DataConfig, tokenizer: Tokenizer, max_tokens: int = 2_000_000, model=None) -> float:
    """Nats/token of validation tokens under the train split's add-one-smoothed unigram model.

    p(v) = (count_train(v) + 1) / (N_train + V); a model's eval loss should fall well below this.
    Each document ends in eos, as in training; each split is sampled (`_sampled`) up to `max_tokens`.
    Media records count their text segments (`model`: the demo_media source needs it).
    """
    train = count_tokens(_sampled(_texts(cfg, "train", model)), tokenizer, max_tokens)
    val = count_tokens(_sampled(_texts(cfg, "validation", model)), tokenizer, max_tokens)
    log_p = np.log(train + 1.0) - math.log(train.sum() + tokenizer.vocab_size)
    return float(-(val * log_p).sum() / val.sum())


def this_process_items(items: Sequence, split: str, what: str, seed: int, *, shuffle: bool, repeat: bool,
                       process_index: int, process_count: int) -> grain.MapDataset:
    """The first Grain stages of every pipeline: `items` (documents or records), shuffled before
    repeating (train: each epoch reshuffled), then this process's share items[process_index::count]."""
    if not repeat and len(items) < process_count:
        raise DataError(f"the {split} split has {len(items)} {what}, fewer than {process_count} processes")
    ds = grain.MapDataset.source(items)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    return ds[process_index::process_count]
