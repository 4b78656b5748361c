"""Held-out exact-match accuracy per record tag (the multimodal demo's metric: `accuracy/<tag>`).

A record is answered exactly when every one of its loss tokens (the answer, ending with end-of-text)
is the argmax of the logits at the position before it, teacher forced. That equals greedy decoding
of the answer: up to the first wrong token greedy decoding and teacher forcing see the same prefix,
and the first wrong token is where greedy decoding leaves the answer.

    pred[t] = argmax_v logits[t, v]          (predicts tokens[t + 1])
    exact(record) = ∧_{t : loss_mask[t] = 1, segment_ids[t] = record} pred[t] = tokens[t + 1]
    accuracy/<tag> = mean over the validation records carrying that "tag"

Every tagged validation record sits alone in its own row (B rows a step, budgets sized to the largest
record), so what precedes it in a training row never helps or hurts it; V4 attention has no segment
mask, so this is also the only fair layout for it. Records without a "tag" are not scored; at most
MAX_RECORDS tagged records (the first, in file order) are, since all of them are held encoded.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax.media.encode import EncodedRecord, MediaBudget, RecordEncoder, collate_row
from deepseek_jax.media.slots import media_from_batch
from deepseek_jax.multihost import put_batch
from deepseek_jax.sharding import in_mesh

MAX_RECORDS = 4096  # tagged validation records scored (the demo has 900)


def segment_exact_match(logits_BTV, tokens_BT, loss_mask_BT, segment_ids_BT, n_segments: int):
    """(exact_BS, scored_BS, pred_BT): segment s + 1 of row b has loss tokens (scored) and all of
    them predicted (exact); pred_BT = the argmax at each position (the guess for token t + 1)."""
    pred_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    target_BT = jnp.roll(tokens_BT, -1, axis=1)  # the last position has no target; its mask is 0
    scored_BT = loss_mask_BT > 0
    wrong_BT = scored_BT & (pred_BT != target_BT)
    in_seg_BTS = segment_ids_BT[..., None] == jnp.arange(1, n_segments + 1)
    scored_BS = jnp.any(scored_BT[..., None] & in_seg_BTS, axis=1)
    wrong_BS = jnp.any(wrong_BT[..., None] & in_seg_BTS, axis=1)
    return scored_BS & ~wrong_BS, scored_BS, pred_BT


@dataclass(frozen=True)
class RecordResult:
    """One scored record: its answer's target ids and the model's argmax guesses for them."""

    name: str
    tag: str
    exact: bool
    target: tuple[int, ...]
    predicted: tuple[int, ...]


def accuracy_by_tag(results: Sequence[RecordResult]) -> dict[str, float]:
    """{"accuracy/<tag>": share of that tag's records answered exactly}, tags sorted."""
    tags = sorted({r.tag for r in results})
    return {f"accuracy/{t}": float(np.mean([r.exact for r in results if r.tag == t])) for t in tags}


def tagged_validation_records(cfg, max_records: int = MAX_RECORDS):
    """(name, record, folder) of the first `max_records` (0 = all) validation records that carry a
    "tag" (data.media sources only)."""
    from deepseek_jax.data.media_records import list_records, parse_record  # data/ imports the encoder

    records = list_records(cfg.data, "validation", cfg.model)
    out = []
    for i in range(len(records)):
        name, raw, folder = records[i]
        record = parse_record(raw, name)
        if isinstance(record.get("tag"), str):
            out.append((name, record, folder))
            if max_records and len(out) == max_records:
                break
    return out


def _budget(encoded: list[EncodedRecord], model_cfg) -> tuple[int, MediaBudget]:
    """(T, budget) that fits the largest record alone: a multiple of 8 tokens, the largest media (at
    least one of each, so no media array is empty)."""
    tokens = max(max(len(r.tokens) for r in encoded), 1)
    return -(-tokens // 8) * 8, MediaBudget.fitting(model_cfg, encoded, at_least=1)


def _rows(encoded: list[EncodedRecord], B: int, T: int, budget: MediaBudget, pad_id: int):
    """Batches of B rows, one record each (tail rows empty), for this process's share of each batch:
    (batch dict of its rows, the indices into `encoded` of the batch's global rows, -1 = empty)."""
    n, i = jax.process_count(), jax.process_index()
    local = B // n
    empty = collate_row([], T, budget, pad_id=pad_id)
    for start in range(0, len(encoded), B):
        index = [k if k < len(encoded) else -1 for k in range(start, start + B)]
        rows = [collate_row([encoded[k]], T, budget, pad_id=pad_id) if k >= 0 else empty
                for k in index[i * local:(i + 1) * local]]
        yield {key: np.stack([r[key] for r in rows]) for key in rows[0]}, index


def _forward(model, model_cfg):
    def forward(params, router, batch):
        out = model.apply({"params": params, "router": router}, batch["tokens"],
                          None if model_cfg.row_positions else batch["positions"], batch["segment_ids"],
                          mtp=False, engram_rows=batch.get("engram_rows"), media=media_from_batch(batch))
        exact_BS, scored_BS, pred_BT = segment_exact_match(out.logits, batch["tokens"], batch["loss_mask"],
                                                           batch["segment_ids"], 1)
        return exact_BS[:, 0], scored_BS[:, 0], pred_BT

    return forward


def _gather(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x)


class Scorer:
    """Scores held-out records with one program's model: `records` (name, record, folder), by default
    the config's tagged validation records, listed, encoded and compiled for on first use. `engram`:
    the data pipeline's Engram stage for a model with Engram (None without)."""

    def __init__(self, program, tokenizer, records: list[tuple[str, dict, str]] | None = None, engram=None):
        self.program, self.tokenizer, self.records, self.engram = program, tokenizer, records, engram
        self._encoded = None

    def _prepare(self) -> None:
        program = self.program
        if self.records is None:
            self.records = tagged_validation_records(program.cfg)
        encoder = RecordEncoder(program.cfg.model, self.tokenizer)
        self._encoded = [encoder.encode(rec, Path(folder), name) for name, rec, folder in self.records]
        self._shape = _budget(self._encoded, program.cfg.model) if self._encoded else None
        self._forward = in_mesh(jax.jit(_forward(program.model, program.cfg.model)), program.mesh, program.rules)

    def __call__(self, params, router) -> list[RecordResult]:
        if self._encoded is None:
            self._prepare()
        if not self._encoded:
            return []
        program, encoded, (T, budget), results = self.program, self._encoded, self._shape, []
        for batch, index in _rows(encoded, program.cfg.data.global_batch_size, T, budget, self.tokenizer.pad_id):
            if self.engram is not None:
                batch = self.engram.map(batch)
            tokens_BT, mask_BT = _gather(batch["tokens"]), _gather(batch["loss_mask"])
            exact_B, scored_B, pred_BT = map(_gather, self._forward(params, router,
                                                                    put_batch(batch, program.batch_sharding)))
            for b, k in enumerate(index):
                if k < 0 or not scored_B[b]:
                    continue
                at = np.flatnonzero(mask_BT[b] > 0)
                results.append(RecordResult(encoded[k].name, encoded[k].tag, bool(exact_B[b]),
                                            tuple(int(x) for x in tokens_BT[b, at + 1]),
                                            tuple(int(x) for x in pred_BT[b, at])))
        return results
