"""The Grain pipeline: documents -> tokenize -> pack -> batch, and its exact-resume iterator.

Stages (`build_dataset`), on the grain 0.2.18 dataset API:
  MapDataset.source(Documents)        lazy, random access: one element = one document's text
  .shuffle(seed) .repeat()            train only; shuffle before repeat reshuffles every epoch
  [process_index::process_count]      this host's documents (disjoint shares of every epoch)
  .map(Tokenize)                      ids + [eos] as int32
  .to_iter_dataset()
  ConcatThenSplitIterDataset          concatenates documents and cuts rows of exactly T tokens
  .batch(B_local, batch_fn=Collate)   pads the tail, adds loss_mask
  .map(EngramRows)                    only for a model with Engram: its hashed n-gram row ids
  .mp_prefetch(worker_count)          optional worker processes (each packs its own slice)

Packing: a document longer than the room left in a row is split; the rest continues in the next row
as a new segment whose positions restart at 0 (ConcatThenSplit's behaviour). No target crosses a
row or a document boundary, so the one target per cut is lost. Only a stream's last row has padding.

Batch (per process, B = global_batch_size // process_count, T = seq_len):
  tokens [B, T] int32, positions [B, T] int32, segment_ids [B, T] int32 (1, 2, ... ; 0 = padding),
  loss_mask [B, T] float32: 1 where token t+1 is in the same row and segment (targets = tokens[:, 1:]).
  engram_rows [B, T, L_engram, U] int32, only with `engram`: Engram table rows (engram_hash.py), whose
  n-grams restart at every segment and never read padding; the compressed map is the tokenizer's.

With `data.media` the stages before batching are media_pack.py's (interleaved text + media records,
whole records per row, per-row media arrays with the batch: media_slots, media_rows, patches, ...);
Engram then treats media spans as dead, and the workers also decode the media.

The iterator's state (Grain's, as JSON) is saved with the model state, tied to a fingerprint of the
data config and process layout, so a resume continues at the next batch or raises naming what changed.
"""

import dataclasses
import gc
import os
import weakref
from collections.abc import Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, WindowShuffleIterDataset

from deepseek_jax.config import DataConfig, EngramConfig, ModelConfig
from deepseek_jax.data.media_pack import media_batches, media_row
from deepseek_jax.data.sources import list_documents, this_process_items
from deepseek_jax.engram_hash import EngramLayout, check_compressed_vocab, compressed_vocab, engram_layout, hash_rows
from deepseek_jax.tokenizer import DataError, Tokenize, Tokenizer

PATH_KEYS = ("source", "tokenizer")  # data config keys naming files: compared with `~` expanded (_comparable)


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


class EngramRows(grain.transforms.Map):
    """Grain stage after batching: adds `engram_rows` [B, T, L, U] int32, hashed in numpy int64 from
    the batch's tokens and segment_ids (engram_hash.hash_rows; segment 0 and media spans are dead)."""

    def __init__(self, layout: EngramLayout, cmap_V: np.ndarray):
        self.layout, self.cmap_V = layout, cmap_V

    def map(self, batch: dict) -> dict:
        dead_BT = batch["media_slots"] >= 0 if "media_slots" in batch else None  # no n-gram crosses a span
        rows = hash_rows(self.layout, self.cmap_V, batch["tokens"], batch["segment_ids"], dead_BT)
        return {**batch, "engram_rows": rows}


_ENGRAM_STAGES = weakref.WeakKeyDictionary()  # tokenizer -> {EngramConfig: EngramRows}


def engram_stage(engram: EngramConfig | None, tokenizer: Tokenizer) -> EngramRows | None:
    """The EngramRows stage of a model's `engram` config (None without Engram), with the tokenizer's
    compressed map checked against `engram.compressed_vocab_size`; built once per tokenizer."""
    if engram is None:
        return None
    stages = _ENGRAM_STAGES.setdefault(tokenizer, {})
    if engram not in stages:
        cmap_V = compressed_vocab(tokenizer)
        check_compressed_vocab(engram, cmap_V)
        stages[engram] = EngramRows(engram_layout(engram), cmap_V)
    return stages[engram]


def padding_batch(
    cfg: DataConfig,
    process_count: int,
    pad_id: int,
    engram: EngramRows | None = None,
    model: ModelConfig | None = None,
) -> dict[str, np.ndarray]:
    """A batch of this process's shape that is all padding: no token is a target (see Collate). With
    `data.media`, also the media arrays of `model`'s modalities, all padding (no span, no picture, no clip)."""
    shape = (cfg.global_batch_size // process_count, cfg.seq_len)
    if cfg.media is not None:
        if model is None:
            raise DataError("padding_batch: a data.media pipeline needs the model config (its modalities)")
        batch = {k: np.repeat(v[None], shape[0], 0) for k, v in media_row(cfg, model, pad_id).items()}
    else:
        zeros = np.zeros(shape, np.int32)
        batch = {"tokens": np.full(shape, pad_id, np.int32), "positions": zeros, "segment_ids": zeros,
                 "loss_mask": np.zeros(shape, np.float32)}
    return batch if engram is None else engram.map(batch)


def build_dataset(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    shuffle: bool = True,
    engram: EngramRows | None = None,
    model: ModelConfig | None = None,
) -> grain.IterDataset:
    """The named Grain stages of the module docstring; validation never shuffles nor repeats.
    `engram` (from `engram_stage`): the model's Engram hashing, a stage after batching. With `data.media`
    the stages are media_pack.py's (records -> encode -> pack -> batch), which need `model`."""
    if cfg.global_batch_size % process_count or not 0 <= process_index < process_count:
        raise DataError(
            f"data.global_batch_size={cfg.global_batch_size} must split evenly over "
            f"{process_count} processes (process_index={process_index})"
        )
    if split == "validation":
        repeat = shuffle = False
    if cfg.media is not None:
        ds = media_batches(cfg, split, tokenizer, model, process_index=process_index,
                           process_count=process_count, repeat=repeat, shuffle=shuffle)
        return _engram_and_workers(ds, cfg, engram)
    ds = this_process_items(list_documents(cfg, split), split, "documents", cfg.seed, shuffle=shuffle,
                            repeat=repeat, process_index=process_index, process_count=process_count)
    ds = ds.map(Tokenize(tokenizer))
    # Two reader threads keep tokenizing ahead of the packer; a small buffer bounds the work wasted
    # (and memory held) when a run stops.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": cfg.seq_len})
    if shuffle and cfg.shuffle_window > 1:  # consecutive rows come from one long document: mix them
        ds = WindowShuffleIterDataset(ds, window_size=cfg.shuffle_window, seed=cfg.seed)
    B = cfg.global_batch_size // process_count
    ds = ds.batch(B, batch_fn=Collate(B, tokenizer.pad_id))
    return _engram_and_workers(ds, cfg, engram)


def _engram_and_workers(ds: grain.IterDataset, cfg: DataConfig, engram: EngramRows | None) -> grain.IterDataset:
    """The stages after batching: Engram row ids, then the optional worker processes."""
    if engram is not None:  # before the workers: they hash in parallel
        ds = ds.map(engram)
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
    """Batches for this process; `get_state()` after n batches resumes exactly at batch n + 1.
    `skipped_records`: media records skipped so far (data.media.skip_bad_records), part of the state."""

    def __init__(self, ds: grain.IterDataset, fingerprint: dict):
        self._it = iter(ds)
        self._fingerprint = fingerprint
        self.skipped_records = 0

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # Worker outputs live in shared memory; copying (~40 KB) frees it now, not at exit.
        batch = {k: np.array(v) for k, v in next(self._it).items()}
        if "skipped_records" in batch:  # per row, counted here: not a model input
            self.skipped_records += int(batch.pop("skipped_records").sum())
        return batch

    def get_state(self) -> dict:
        return {"fingerprint": self._fingerprint, "grain": _to_json(self._it.get_state()),
                "skipped_records": self.skipped_records}

    def set_state(self, state: dict) -> None:
        old = state.get("fingerprint", {})
        new = self._fingerprint
        diff = sorted(k for k in new if _comparable(k, old.get(k)) != _comparable(k, new[k]))
        if diff:
            raise DataError(
                "data state was saved by a different pipeline; changed: "
                + ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in diff)
            )
        self._it.set_state(_from_json(state["grain"]))
        self.skipped_records = state.get("skipped_records", 0)

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
    engram: EngramRows | None = None,
    model: ModelConfig | None = None,
) -> DataIterator:
    """This process's batches of `split`; validation ignores shuffle/repeat (one fixed pass).

    With `worker_count > 0`, Grain spawns worker processes, so the calling script needs an
    `if __name__ == "__main__":` guard; call `close()` to stop them. The state is tied to the data
    config and process layout: `set_state` raises DataError naming what changed. `engram` adds
    `engram_rows` to every batch (a pure function of it: not part of the resume state). `model`: see
    `build_dataset` (media records only).
    """
    kw = {"process_index": process_index, "process_count": process_count, "repeat": repeat}
    ds = build_dataset(cfg, split, tokenizer, shuffle=shuffle, engram=engram, model=model, **kw)
    fingerprint = {"split": split, "shuffle": shuffle, **kw, **dataclasses.asdict(cfg)}
    return DataIterator(ds, fingerprint)


def _comparable(key: str, value):
    """A fingerprint value as set_state compares it: the path keys with `~` expanded, since a state saved before
    the config expanded `~` holds "~/corpus" where the same config now gives "/home/u/corpus"."""
    return os.path.expanduser(value) if key in PATH_KEYS and isinstance(value, str) else value


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
