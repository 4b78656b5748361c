"""Held-out exact match per record tag (exact_match.py): the metric on hand-made logits against a
numpy loop, and the scoring loop's rows, alignment and tags with an oracle model."""

from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_config
from deepseek_jax.exact_match import RecordResult, Scorer, accuracy_by_tag, segment_exact_match
from deepseek_jax.sharding import batch_sharding, make_mesh, rules

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _reference(logits, tokens, loss_mask, segment_ids, n_segments):
    """Record by record, position by position (float64 numpy; ties cannot occur: distinct logits)."""
    B, T, _ = logits.shape
    exact, scored = np.zeros((B, n_segments), bool), np.zeros((B, n_segments), bool)
    for b in range(B):
        for s in range(1, n_segments + 1):
            at = [t for t in range(T - 1) if segment_ids[b, t] == s and loss_mask[b, t] > 0]
            scored[b, s - 1] = bool(at)
            exact[b, s - 1] = bool(at) and all(np.argmax(logits[b, t]) == tokens[b, t + 1] for t in at)
    return exact, scored


def test_segment_exact_match_on_hand_made_logits():
    rng = np.random.default_rng(0)
    B, T, V, S = 4, 24, 11, 3
    tokens = rng.integers(0, V, (B, T))
    segment_ids = np.sort(rng.integers(0, S + 1, (B, T)), axis=1)[:, ::-1].copy()  # padding (0) at the end
    loss_mask = (rng.random((B, T)) < 0.4) & (segment_ids > 0) & (np.roll(segment_ids, -1, 1) == segment_ids)
    loss_mask[:, -1] = False
    logits = rng.normal(size=(B, T, V))
    right = rng.random((B, T)) < 0.85  # most positions put the target first, the rest a wrong token
    target = np.roll(tokens, -1, axis=1)
    for b, t in zip(*np.nonzero(right)):
        logits[b, t, target[b, t]] = logits[b, t].max() + 1.0
    for b, t in zip(*np.nonzero(~right)):
        logits[b, t, (target[b, t] + 1) % V] = logits[b, t].max() + 1.0
    want_exact, want_scored = _reference(logits, tokens, loss_mask, segment_ids, S)
    assert want_exact.any() and (want_scored & ~want_exact).any() and not want_scored.all()  # all cases occur
    exact, scored, pred = jax.jit(segment_exact_match, static_argnums=4)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), jnp.asarray(loss_mask, jnp.float32),
        jnp.asarray(segment_ids), S)
    np.testing.assert_array_equal(np.asarray(exact), want_exact)
    np.testing.assert_array_equal(np.asarray(scored), want_scored)
    np.testing.assert_array_equal(np.asarray(pred), logits.argmax(-1))


def test_accuracy_by_tag():
    results = [RecordResult("a", "image", True, (1,), (1,)), RecordResult("b", "image", False, (1,), (2,)),
               RecordResult("c", "audio", True, (3, 0), (3, 0))]
    assert accuracy_by_tag(results) == {"accuracy/audio": 1.0, "accuracy/image": 0.5}
    assert accuracy_by_tag([]) == {}


def _record(name, n_tokens, pictures=(), clips=(), image_rows=0):
    """An EncodedRecord with `pictures` ((n_vit_h, n_vit_w) each), `clips` (log-mel frames each) and
    `image_rows` IMAGE slots; its token, loss and ref contents do not matter here."""
    from deepseek_jax.media.encode import EncodedRecord
    from deepseek_jax.media.slots import IMAGE, TEXT

    slots = np.full(n_tokens, TEXT, np.int32)
    slots[:image_rows] = IMAGE
    return EncodedRecord(name=name, tokens=np.zeros(n_tokens, np.int32), slots=slots,
                         loss=np.zeros(n_tokens, np.float32), ref=np.full((n_tokens, 2), -1, np.int32),
                         pictures=[(np.zeros((h * w, 12), np.float32), (h, w)) for h, w in pictures],
                         clips=[np.zeros((f, 8), np.float32) for f in clips])


def test_budget_fits_the_largest_record_alone():
    """MediaBudget.fitting = the per-field maximum of record_cost over the records (each record alone),
    floored at `at_least`; exact_match._budget adds T = the longest record rounded up to a multiple of 8."""
    from deepseek_jax.config import load_model_config
    from deepseek_jax.exact_match import _budget
    from deepseek_jax.media.encode import MediaBudget

    model_cfg = load_model_config([CONFIGS / "model/tiny_multimodal.yaml"])
    records = [_record("a", 30, pictures=[(4, 4), (2, 6)], image_rows=7), _record("b", 41, clips=[61, 20, 33]),
               _record("c", 5)]
    got = MediaBudget.fitting(model_cfg, records)
    # patches max(16 + 12, 0, 0), rows max(7, 0, 0), clips max(0, 3, 0), frames max(0, 61, 0)
    assert (got.max_patches, got.max_image_rows, got.max_audio_clips, got.max_audio_frames) == (28, 7, 3, 61)
    assert got.vision == model_cfg.vision and got.audio == model_cfg.audio
    assert MediaBudget.fitting(model_cfg, records[:1]) == MediaBudget.for_model(
        model_cfg, max_patches=28, max_image_rows=7)
    assert MediaBudget.fitting(model_cfg, records[2:], at_least=1) == MediaBudget.for_model(
        model_cfg, max_patches=1, max_image_rows=1, max_audio_clips=1, max_audio_frames=1)
    T, budget = _budget(records, model_cfg)
    assert T == 48 and budget == MediaBudget.fitting(model_cfg, records, at_least=1) == got


class _Out(NamedTuple):
    logits: jax.Array


class OracleModel:
    """Logits that put the next token first, except on records whose answer starts with `wrong_first`
    (there the answer's end-of-text is missed): the loop must score exactly those records wrong."""

    def __init__(self, vocab: int, wrong_first: int):
        self.vocab, self.wrong_first = vocab, wrong_first

    def apply(self, variables, tokens_BT, positions_BT, segment_ids_BT, *, mtp, engram_rows, media):
        assert media is not None and media.slots.shape == tokens_BT.shape and not mtp
        target_BT = jnp.roll(tokens_BT, -1, axis=1)
        first_B = jnp.max(jnp.where((media.slots >= 0) & (jnp.roll(media.slots, -1, axis=1) < 0), target_BT, -1), 1)
        miss_BT = (first_B == self.wrong_first)[:, None] & (target_BT == 0)  # the eos of those answers
        guess_BT = jnp.where(miss_BT, 5, target_BT)
        return _Out(jax.nn.one_hot(guess_BT, self.vocab) * 10.0)


@pytest.mark.slow
def test_exact_match_loop_with_an_oracle(tmp_path):
    """Demo validation records through RecordEncoder / collate_row rows, one record a row, B = 4 rows a
    batch and a ragged tail: every record is scored once with its own answer ids, and only the records
    whose answer starts with the oracle's blind spot (the first image record's digit) are wrong."""
    from deepseek_jax.data import demo_media as dm
    from deepseek_jax.exact_match import tagged_validation_records
    from deepseek_jax.tokenizer import Tokenizer

    cfg = load_config([CONFIGS / "train/tiny_multimodal.yaml"],
                      [f"train.run_dir={tmp_path}", "data.global_batch_size=4"])
    spec = dm.DemoSpec(train_per_task=2, val_per_task=7, val_digit_rows=30, val_sequences=30)
    folder = dm.demo_records(cfg.model, tmp_path / "cache", spec)
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    cfg = load_config([CONFIGS / "train/tiny_multimodal.yaml"],
                      [f"train.run_dir={tmp_path}", "data.global_batch_size=4", f"data.source={folder}",
                       f"data.tokenizer={folder / 'tokenizer.json'}"])
    records = tagged_validation_records(cfg)
    assert len(records) == 3 * spec.val_per_task and records[0][0] == "validation.jsonl:1"
    blind = tok.encode(next(r for _, r, _ in records if r["tag"] == "image")["segments"][-1]["text"])[0]
    mesh = make_mesh(cfg.mesh)
    program = SimpleNamespace(cfg=cfg, model=OracleModel(cfg.model.vocab_size, blind), mesh=mesh,
                              rules=rules(cfg.mesh), batch_sharding=batch_sharding(mesh, rules(cfg.mesh)))
    scorer = Scorer(program, tok, records)
    results = scorer({}, {})
    assert scorer({}, {}) == results  # encoded and compiled once, reused
    assert [r.name for r in results] == [name for name, _, _ in records]
    for r, (_, rec, _) in zip(results, records):
        answer = tok.encode(rec["segments"][-1]["text"])
        assert r.tag == rec["tag"] and r.target == tuple(answer)
        assert r.exact == (answer[0] != blind), r
        assert r.predicted == (r.target if r.exact else (*answer[:-1], 5))
    assert 0 < sum(r.exact for r in results) < len(results)
    assert set(accuracy_by_tag(results)) == {"accuracy/audio", "accuracy/image", "accuracy/video"}
