"""The Grain stages of a `data.media` pipeline: interleaved text + media records -> packed rows -> batches.

Stages (`media_batches`; pipeline.py then adds the Engram rows and the worker processes):
  MapDataset.source(Records)          lazy: one element = (record name, raw JSON, its folder)
  .shuffle(seed) .repeat()            train only; shuffle before repeat reshuffles every epoch
  [process_index::process_count]      this host's records
  .map(EncodeRecord)                  JSON -> token ids, slot codes, pictures, clips (media/encode.py): the
                                      images, audio and video are decoded here, so in the worker processes
                                      when data.worker_count > 0
  .to_iter_dataset()
  PackRecords                         whole records, in order, into rows of T positions while every budget
                                      holds (data.media: patches, image rows, clips, frames per clip)
  .batch(B_local, batch_fn=StackRows) pads missing tail rows with padding rows

(data.shuffle_window is unused here: records are shuffled before packing, and a record is never cut.)

A record is never split (its media could not be): the record that does not fit starts the next row, so
rows end in padding (segment 0). A record that alone exceeds seq_len or a budget is a DataError naming it
("file:line"), as is one whose JSON or media is bad; with data.media.skip_bad_records both are counted
skips instead, and more than max_skipped_fraction of the records seen (judged over at least the first
SKIP_GRACE records) stops with a DataError. Each row carries `skipped_records` (records skipped while
filling it); the DataIterator sums and removes it. Row layout (tokens, loss_mask, media_slots, patches, …):
media/encode.py `collate_row` and the shared contract (media/slots.py).

Resume: PackRecords' state is its parent's state before the record waiting for the next row (read again
on restore, as ConcatThenSplit does), plus its seen / skipped counts, so a restored iterator continues at
the next batch exactly.
"""

from pathlib import Path
from typing import NamedTuple

import grain
import numpy as np

from deepseek_jax.config import DataConfig, ModelConfig
from deepseek_jax.data.media_records import list_records, parse_record
from deepseek_jax.data.sources import this_process_items
from deepseek_jax.media.encode import MediaBudget, RecordEncoder, check_record_fits, collate_row, record_cost
from deepseek_jax.tokenizer import DataError, Tokenizer

SKIP_GRACE = 100  # records seen before max_skipped_fraction is judged on the running share alone


def media_budget(cfg: DataConfig, model: ModelConfig) -> MediaBudget:
    """The per-row budgets of `cfg.media` with its zeros resolved for `model` (config/run.py)."""
    return MediaBudget.for_model(model, **cfg.media.budgets(model, cfg.seq_len))


def media_row(cfg: DataConfig, model: ModelConfig, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One all-padding row [T, ...] of a media pipeline: every key a batch row has, at its shape and dtype."""
    return collate_row([], cfg.seq_len, media_budget(cfg, model), pad_id=pad_id)


class Skipped(NamedTuple):
    """A record left out (data.media.skip_bad_records) and why."""

    name: str
    reason: str


class EncodeRecord(grain.transforms.Map):
    """(name, raw JSON, folder) -> EncodedRecord, or Skipped when skipping bad records. Any error is a
    DataError naming the record (it crosses Grain's worker processes as one)."""

    def __init__(self, encoder: RecordEncoder, skip_bad: bool):
        self.encoder, self.skip_bad = encoder, skip_bad

    def map(self, item):
        name, raw, folder = item
        try:
            return self.encoder.encode(parse_record(raw, name), Path(folder), name)
        except DataError as e:
            if self.skip_bad:
                return Skipped(name, str(e))
            raise
        except Exception as e:  # noqa: BLE001 (a bug, not bad data: never skipped, but named)
            raise DataError(f"record {name} could not be encoded: {type(e).__name__}: {e}") from e


class _PackIterator(grain.DatasetIterator):
    """Rows of whole records (PackRecords); see the module docstring for the state."""

    def __init__(self, parent: grain.DatasetIterator, pack: "PackRecords"):
        super().__init__(parent)
        self._pack = pack
        self._pending, self._pending_state = None, None  # a record read, waiting for the next row
        self._seen = self._skipped = self._row_skips = 0

    def _next_record(self):
        """The waiting record, else the parent's next (None at its end), counting skips."""
        while True:
            if self._pending is not None:
                return self._pending
            self._pending_state = self._parent.get_state()
            try:
                rec = next(self._parent)
            except StopIteration:
                return None
            self._seen += 1
            if isinstance(rec, Skipped):
                self._skip(rec.name, rec.reason)
                continue
            self._pending = rec

    def _skip(self, name: str, reason: str) -> None:
        self._skipped += 1
        self._row_skips += 1
        frac = self._pack.max_skipped_fraction
        if self._skipped > frac * max(self._seen, SKIP_GRACE):
            raise DataError(
                f"{self._skipped} of {self._seen} media records skipped, over data.media.max_skipped_fraction="
                f"{frac} (judged over at least {SKIP_GRACE} records); the last: {name}: {reason}")

    def __next__(self) -> dict[str, np.ndarray]:
        p = self._pack
        row, used, self._row_skips = [], np.zeros(4, np.int64), 0
        limits = (p.seq_len, p.budget.max_patches, p.budget.max_image_rows, p.budget.max_audio_clips)
        while (rec := self._next_record()) is not None:
            try:
                check_record_fits(rec, p.seq_len, p.budget)
            except DataError as e:
                if not p.skip_bad:
                    raise
                self._pending = None
                self._skip(rec.name, str(e))
                continue
            cost = used + record_cost(rec)[:4]
            if any(c > limit for c, limit in zip(cost, limits)):
                break  # starts the next row
            row.append(rec)
            used, self._pending = cost, None
        if not row:  # the parent has ended (skips after the last row are in the state's count only)
            raise StopIteration
        out = collate_row(row, p.seq_len, p.budget, pad_id=p.pad_id)
        out["skipped_records"] = np.int32(self._row_skips)
        return out

    def get_state(self) -> dict:
        waiting = self._pending is not None
        return {"parent": self._pending_state if waiting else self._parent.get_state(),
                "seen": self._seen - waiting, "skipped": self._skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self._seen, self._skipped = state["seen"], state["skipped"]


class PackRecords(grain.IterDataset):
    """Encoded records -> rows of whole records within seq_len and the media budgets (module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, budget: MediaBudget, pad_id: int, *,
                 skip_bad: bool = False, max_skipped_fraction: float = 0.0):
        super().__init__(parent)
        self.seq_len, self.budget, self.pad_id = seq_len, budget, pad_id
        self.skip_bad, self.max_skipped_fraction = skip_bad, max_skipped_fraction

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self)


class StackRows:
    """Rows -> one batch [B, ...]; missing tail rows are padding rows (segment 0, no media)."""

    def __init__(self, batch_size: int, pad_row: dict[str, np.ndarray]):
        self.batch_size, self.pad_row = batch_size, {**pad_row, "skipped_records": np.int32(0)}

    def __call__(self, rows) -> dict[str, np.ndarray]:
        rows = list(rows) + [self.pad_row] * (self.batch_size - len(rows))
        return {k: np.stack([r[k] for r in rows]) for k in self.pad_row}


def media_batches(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    model: ModelConfig | None,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    shuffle: bool = True,
) -> grain.IterDataset:
    """This process's batches of packed media records (module docstring), before Engram and workers."""
    if model is None:
        raise DataError("a data.media pipeline needs the model config (its modalities and placeholder ids)")
    ds = this_process_items(list_records(cfg, split, model), split, "records", cfg.seed,
                            shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count)
    ds = ds.map(EncodeRecord(RecordEncoder(model, tokenizer), cfg.media.skip_bad_records))
    # Two reader threads decode ahead of the packer; a small buffer bounds the work lost when a run stops.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    budget = media_budget(cfg, model)
    ds = PackRecords(ds, cfg.seq_len, budget, tokenizer.pad_id, skip_bad=cfg.media.skip_bad_records,
                     max_skipped_fraction=cfg.media.max_skipped_fraction)
    B = cfg.global_batch_size // process_count
    return ds.batch(B, batch_fn=StackRows(B, media_row(cfg, model, tokenizer.pad_id)))
