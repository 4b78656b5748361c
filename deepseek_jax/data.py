"""Data: documents -> tokenize -> pack -> batch, as one Grain pipeline with exact-resume state.

Stages (`build_dataset`), on the grain 0.2.18 dataset API:
  MapDataset.source(Documents)        lazy, random access: one element = one document's text
  .shuffle(seed) .repeat()            train only; shuffle before repeat reshuffles every epoch
  [process_index::process_count]      this host's documents (disjoint shares of every epoch)
  .map(Tokenize)                      ids + [eos] as int32
  .to_iter_dataset()
  ConcatThenSplitIterDataset          concatenates documents and cuts rows of exactly T tokens
  .batch(B_local, batch_fn=Collate)   pads the tail, adds loss_mask
  .mp_prefetch(worker_count)          optional worker processes (each packs its own slice)

Packing: a document longer than the room left in a row is split; the rest continues in the next row
as a new segment whose positions restart at 0 (ConcatThenSplit's behaviour). No target crosses a
row or a document boundary, so the one target per cut is lost. Only a stream's last row has padding.

Batch (per process, B = global_batch_size // process_count, T = seq_len):
  tokens [B, T] int32, positions [B, T] int32, segment_ids [B, T] int32 (1, 2, ... ; 0 = padding),
  loss_mask [B, T] float32: 1 where token t+1 is in the same row and segment (targets = tokens[:, 1:]).

Documents: `source: stdlib` is every *.py under this Python's stdlib (no site-/dist-packages);
otherwise a file, directory (recursive, hidden files skipped) or glob. Text files are one document
each, a .jsonl line is one (field `jsonl_field`), an .array_record record is one (UTF-8). Blank
documents are dropped. A document is in validation iff sha1(its path relative to the source root,
plus line / record index) / 2**160 < val_fraction, so the split does not move when files are added.
"""

import dataclasses
import functools
import gc
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
from grain.experimental import ConcatThenSplitIterDataset, WindowShuffleIterDataset

from deepseek_jax.config import DataConfig
from deepseek_jax.tokenizer import DataError, Tokenize, Tokenizer, count_tokens, load_or_train

BPE_TRAIN_BYTES = 20_000_000  # cap on BPE training text: the stdlib's 31 MB adds little
SPLITS = ("train", "validation")

# ----------------------------------------------------------------------------------------------
# Documents


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
            f"documents fall there with data.val_fraction={cfg.val_fraction}"
        )
    return Documents([docs.refs[i] for i in keep], [docs.names[i] for i in keep], docs.field)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: DataConfig, run_dir: str | Path, model_vocab_size: int) -> Tokenizer:
    """`cfg.tokenizer` if given; else `run_dir/tokenizer.json`, trained on the train split once."""
    return load_or_train(cfg, run_dir, model_vocab_size, lambda: _bpe_texts(cfg))


def _bpe_texts(cfg: DataConfig):
    total = 0
    for text in _sampled(list_documents(cfg, "train")):
        yield text
        total += len(text)
        if total >= BPE_TRAIN_BYTES:
            return


def _sampled(docs: Documents):
    """Texts in sha1-of-name order: any prefix is a fixed sample across all directories."""
    for i in sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs.names[i].encode()).digest()):
        yield docs[i]


# ----------------------------------------------------------------------------------------------
# Pipeline


class Collate:
    """Packed rows -> one fixed-shape batch; missing tail rows are padding (segment 0)."""

    def __init__(self, batch_size: int, pad_id: int):
        self.batch_size, self.pad_id = batch_size, pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
        n, T = len(rows), rows[0]["tokens"].shape[0]
        out = {
            k: np.zeros((self.batch_size, T), np.int32)
            for k in ("tokens", "positions", "segment_ids")
        }
        out["tokens"][:n] = [r["tokens"] for r in rows]
        out["positions"][:n] = [r["tokens_positions"] for r in rows]
        out["segment_ids"][:n] = [r["tokens_segment_ids"] for r in rows]
        seg = out["segment_ids"]
        out["tokens"][seg == 0] = self.pad_id
        out["positions"][seg == 0] = 0
        next_same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
        out["loss_mask"] = np.pad(next_same, ((0, 0), (0, 1))).astype(np.float32)
        return out


def padding_batch(cfg: DataConfig, process_count: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch of this process's shape that is all padding: no token is a target (see Collate)."""
    shape = (cfg.global_batch_size // process_count, cfg.seq_len)
    zeros = np.zeros(shape, np.int32)
    return {
        "tokens": np.full(shape, pad_id, np.int32),
        "positions": zeros,
        "segment_ids": zeros,
        "loss_mask": np.zeros(shape, np.float32),
    }


def build_dataset(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    shuffle: bool = True,
) -> grain.IterDataset:
    """The named Grain stages of the module docstring; validation never shuffles nor repeats."""
    if cfg.global_batch_size % process_count or not 0 <= process_index < process_count:
        raise DataError(
            f"data.global_batch_size={cfg.global_batch_size} must split evenly over "
            f"{process_count} processes (process_index={process_index})"
        )
    docs = list_documents(cfg, split)
    if split == "validation":
        repeat = shuffle = False
    if not repeat and len(docs) < process_count:
        raise DataError(
            f"the {split} split has {len(docs)} documents, fewer than {process_count} processes"
        )
    ds = grain.MapDataset.source(docs)
    if shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if repeat:
        ds = ds.repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(Tokenize(tokenizer))
    # Two reader threads keep tokenizing ahead of the packer; a small buffer bounds the work wasted
    # (and memory held) when a run stops.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": cfg.seq_len})
    if shuffle and cfg.shuffle_window > 1:  # consecutive rows come from one long document: mix them
        ds = WindowShuffleIterDataset(ds, window_size=cfg.shuffle_window, seed=cfg.seed)
    B = cfg.global_batch_size // process_count
    ds = ds.batch(B, batch_fn=Collate(B, tokenizer.pad_id))
    if cfg.worker_count:
        from absl import flags  # Grain reads its absl flags when starting workers

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.multiprocessing.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=2
            )
        )
    return ds


class DataIterator:
    """Batches for this process; `get_state()` after n batches resumes exactly at batch n + 1."""

    def __init__(self, ds: grain.IterDataset, fingerprint: dict):
        self._it = iter(ds)
        self._fingerprint = fingerprint

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # Worker outputs live in shared memory; copying (~40 KB) frees it now, not at exit.
        return {k: np.array(v) for k, v in next(self._it).items()}

    def get_state(self) -> dict:
        return {"fingerprint": self._fingerprint, "grain": _to_json(self._it.get_state())}

    def set_state(self, state: dict) -> None:
        old = state.get("fingerprint", {})
        diff = sorted(k for k in self._fingerprint if old.get(k) != self._fingerprint[k])
        if diff:
            raise DataError(
                "data state was saved by a different pipeline; changed: "
                + ", ".join(f"{k} {old.get(k)!r} -> {self._fingerprint[k]!r}" for k in diff)
            )
        self._it.set_state(_from_json(state["grain"]))

    def close(self) -> None:
        """Stops Grain's threads and worker processes; the iterator is unusable afterwards."""
        if self._it is not None:
            self._it.close()
            self._it = None
            gc.collect()  # finalize Grain's iterators now: at interpreter exit their __del__ fails


def make_iterator(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    shuffle: bool = True,
) -> DataIterator:
    """This process's batches of `split`; validation ignores shuffle/repeat (one fixed pass).

    With `worker_count > 0`, Grain spawns worker processes, so the calling script needs an
    `if __name__ == "__main__":` guard; call `close()` to stop them. The state is tied to the data
    config and process layout: `set_state` raises DataError naming what changed.
    """
    kw = {"process_index": process_index, "process_count": process_count, "repeat": repeat}
    ds = build_dataset(cfg, split, tokenizer, shuffle=shuffle, **kw)
    fingerprint = {"split": split, "shuffle": shuffle, **kw, **dataclasses.asdict(cfg)}
    return DataIterator(ds, fingerprint)


def _to_json(x):
    """Grain state -> JSON, keeping tuples and non-string keys (json would turn them into lists/str)."""
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: _to_json(v) for k, v in x.items()}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def _from_json(x):
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {_from_json(k): _from_json(v) for k, v in x["__items__"]}
        return {k: _from_json(v) for k, v in x.items()}
    return [_from_json(v) for v in x] if isinstance(x, list) else x


# ----------------------------------------------------------------------------------------------
# Baseline


def unigram_baseline(cfg: DataConfig, tokenizer: Tokenizer, max_tokens: int = 2_000_000) -> float:
    """Nats/token of validation tokens under the train split's add-one-smoothed unigram model.

    p(v) = (count_train(v) + 1) / (N_train + V); a model's eval loss should fall well below this.
    Each document ends in eos, as in training; each split is sampled (`_sampled`) up to `max_tokens`.
    """
    train = count_tokens(_sampled(list_documents(cfg, "train")), tokenizer, max_tokens)
    val = count_tokens(_sampled(list_documents(cfg, "validation")), tokenizer, max_tokens)
    log_p = np.log(train + 1.0) - math.log(train.sum() + tokenizer.vocab_size)
    return float(-(val * log_p).sum() / val.sum())
