"""DeepSeek-V4.1's layer plan, shared-KV pieces and decode path (parity: tests/parity/test_parity_v41.py).

- the layer roles of V4.1-Flash equal the schedule of the reference notes §1.2, and the config checks
  transformers' validation rules with errors that name the field;
- the candidate pool and the FP4 (e4m3-scaled) fake-quant against plain numpy statements;
- decoding in chunks (prefill 21 + 21, then single tokens) equals the full forward. The fake-quant is
  discontinuous (a 1-ulp difference between two summation orders can move a value across a rounding
  boundary), so the exact-equality check runs with `shared_kv.qat` off and a second one with it on
  bounds the difference.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, load_model_config
from deepseek_jax.engram_hash import EngramHashState, engram_layout, hash_rows
from deepseek_jax.layers.attention.indexer import index_scores
from deepseek_jax.layers.attention.v41 import candidate_picks
from deepseek_jax.models import build_cache, build_model, layer_kinds, layer_segments
from deepseek_jax.quant import fake_quant_fp4_e4m3
from tests.utils import ROOT

CONFIGS = ROOT / "configs" / "model"


def flash():
    return load_model_config([CONFIGS / "deepseek_v41_flash.yaml"])


def test_flash_layer_roles_follow_the_released_schedule():
    kinds = layer_kinds(flash())
    roles = {i: k.share for i, k in enumerate(kinds)}
    assert [roles[i] for i in (0, 1)] == ["none", "none"]
    assert [i for i, r in roles.items() if r == "source"] == [2, 8, 14]
    assert [i for i, r in roles.items() if r == "candidate"] == [20]
    assert [i for i, r in roles.items() if r == "reindex"] == [24, 28, 32, 36]
    assert all(roles[i] == "reuse" for i in (3, 7, 9, 13, 15, 19, 21, 23, 25, 39))
    assert [i for i, k in enumerate(kinds) if k.memory != "none"] == [1, 14]
    assert [i for i, k in enumerate(kinds) if k.capture] == [37, 38, 39]
    segments = layer_segments(kinds)
    assert all(s.repeats == 1 for s in segments if s.kinds[0].produces)
    assert sum(len(s.kinds) * s.repeats for s in segments) == 40
    print(f"V4.1-Flash: {len(segments)} scan segments")


@pytest.mark.parametrize("change, field", [
    (dict(kv_source_layers=(3, 8, 14, 20)), "shared_kv"),  # 3 is not the first of its run: 2 has no source
    (dict(candidate_source_layer=21), "candidate_source_layer"),
    (dict(candidate_topk_blocks=2, candidate_block_size=8), "candidate_topk_blocks"),
])
def test_schedule_errors_name_the_field(change, field):
    cfg = flash()
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(cfg, shared_kv=dataclasses.replace(cfg.shared_kv, **change))


def _pool_numpy(scores, visible, pos, ratio, n_blocks, block):
    B, T, Z = scores.shape
    out = np.zeros((B, T, Z), bool)
    for b in range(B):
        for t in range(T):
            s = np.where(visible[b, t], scores[b, t], -np.inf)
            s = np.concatenate([s, np.full(-Z % block, -np.inf)])
            best = s.reshape(-1, block).max(-1)
            newest = (pos[b, t] + 1) // ratio - 1
            if newest >= 0:
                best[newest // block] = np.inf
            order = np.argsort(-best, kind="stable")[:n_blocks]
            for k in order:
                if best[k] > -np.inf:
                    out[b, t, k * block:(k + 1) * block] = True
    return out[..., :Z]


@pytest.mark.parametrize("ratio", [1, 2])
def test_candidate_pool_matches_numpy(ratio):
    """The kept block ids of `candidate_picks` (streamed over chunks of whole blocks), as an entry
    mask, against the numpy statement over the same f32 scores."""
    rng = np.random.default_rng(0)
    B, T, P, Y = 2, 23, 4, 8
    Z = T // ratio + 1
    pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    visible = np.arange(Z)[None, None] < ((pos + 1) // ratio)[..., None]
    iq, ik = rng.normal(size=(B, T, P, Y)).astype(np.float32), rng.normal(size=(B, Z, Y)).astype(np.float32)
    iw = rng.normal(size=(B, T, P)).astype(np.float32)
    scores = np.asarray(index_scores(iq, ik, iw, visible))
    _, blocks = candidate_picks(iq, iw, pos, ik, ratio=ratio, topk=4, k_block=4, n_blocks=2, block=4)
    got = (np.arange(Z)[None, None, :, None] // 4 == np.asarray(blocks)[:, :, None, :]).any(-1)
    np.testing.assert_array_equal(got, _pool_numpy(scores, visible, pos, ratio, 2, 4))


def test_fp4_e4m3_fake_quant_matches_a_numpy_statement():
    """s = e4m3(max(amax, 6·2^-9)/6) per 16, x̂ = e2m1(x/s)·s with round-to-nearest-even on the code
    grid (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), saturating at ±6."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 64)).astype(np.float32) * rng.choice([1e-3, 1.0, 40.0], size=(5, 1)).astype(np.float32)
    x[0, :16] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -5.0, 0, 0, 0, 0, 0, 0], np.float32)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    blocks = x.reshape(5, 4, 16).astype(np.float64)
    amax = np.maximum(np.abs(blocks).max(-1, keepdims=True), 6 * 2.0**-9)
    s = (amax / 6).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    y = np.clip(blocks / s, -6, 6)
    dist = np.abs(np.abs(y)[..., None] - grid)
    idx = np.argmin(dist, -1)
    tie = np.isclose(dist.min(-1), np.sort(dist, -1)[..., 1])  # two nearest codes: the even mantissa wins
    idx = np.where(tie & (idx % 2 == 1), idx + 1, idx)
    want = (np.sign(y) * grid[idx] * s).reshape(5, 64)
    np.testing.assert_array_equal(np.asarray(fake_quant_fp4_e4m3(jnp.asarray(x), 16)), want.astype(np.float32))
    np.testing.assert_array_equal(want[0, :8], [0, 1, 1, 2, 2, 4, 4, 6])


# tiny_v41 cut to 3 layers (sliding window; a ratio-2 kv and index source with Engram before it; the ratio-1
# kv and candidate source), no DSpark: for checks of one layer's part, at about a third of the 9 layers' compile
V41_THREE = ["model." + o for o in (
    "n_layers=3", "compress_ratios=[0,2,1]", "num_nextn_predict_layers=0", "dspark=null",
    "shared_kv.kv_source_layers=[1,2]", "shared_kv.index_source_layers=[1,2]", "shared_kv.candidate_source_layer=2",
    "engram.layer_ids=[1]", "engram.num_embeddings=[8214]")]


# ... cut to 5 layers that keep every layer role: sliding window, Engram before the ratio-2 kv and index
# source, the ratio-1 candidate source, a reuse layer and a reindex layer, and both DSpark stages (reading
# the last 3 layers); for whole-model checks whose cost is the compile (tests/test_context_parallel.py)
V41_FIVE = ["model." + o for o in (
    "n_layers=5", "compress_ratios=[0,2,1,1,1,0,0]", "shared_kv.kv_source_layers=[1,2]",
    "shared_kv.index_source_layers=[1,2,4]", "shared_kv.candidate_source_layer=2", "engram.layer_ids=[1]",
    "engram.num_embeddings=[8214]", "dspark.target_layers=[2,3,4]")]


def tiny_cfg(qat: bool, overrides=()):
    """tiny_v41 at vocab 256 with the KV / indexer fake-quant on or off."""
    cfg = load_model_config([CONFIGS / "tiny_v41.yaml"], list(overrides))
    return dataclasses.replace(cfg, vocab_size=256, shared_kv=dataclasses.replace(cfg.shared_kv, qat=qat))


@functools.cache
def tiny(qat: bool):
    cfg = tiny_cfg(qat)
    model = build_model(cfg)
    B, T = 2, 41
    tokens = jax.random.randint(jax.random.key(0), (B, T + 8), 0, 256)
    rows = jax.random.randint(jax.random.key(2), (B, T + 8, 2, cfg.engram.n_columns), 0, 8000)
    variables = jax.jit(model.init)(jax.random.key(1), tokens[:, :T], engram_rows=rows[:, :T])
    return cfg, model, variables, tokens, rows


# prefill 21 (odd: a ratio-2 block left pending), 21 more from slot 21 (across the window of 32), then single
# tokens to 49: two prefill shapes, one compile each (tiny(False)'s shared by the decode tests via the cache)
CHUNKS = (21, 21) + (1,) * 7


def _decode(cfg, model, variables, tokens, rows, chunks):
    cache, start, logits = build_cache(cfg, tokens.shape[0], 64), 0, []
    step = jax.jit(lambda v, t, c, i, r: model.apply(v, t, cache=c, cache_index=i, mtp=False, engram_rows=r),
                   static_argnums=())
    for n in chunks:
        out = step(variables, tokens[:, start:start + n], cache, jnp.int32(start), rows[:, start:start + n])
        cache, start = out.cache, start + n
        logits.append(out.logits)
    return jnp.concatenate(logits, axis=1)


@pytest.mark.slow  # ~25 s each; the inner loop decodes in test_decode_with_the_incremental_hash_state_...
@pytest.mark.parametrize("qat", [False, True])
def test_decode_in_chunks_equals_the_full_forward(qat):
    cfg, model, variables, tokens, rows = tiny(qat)
    full = jax.jit(model.apply)(variables, tokens, engram_rows=rows).logits
    dec = _decode(cfg, model, variables, tokens, rows, CHUNKS)
    err = float(jnp.abs(dec - full).max())
    print(f"qat={qat}: max |Δlogit| chunked decode vs full = {err:.2e}")
    assert err < (1e-4 if not qat else 5e-2)


@pytest.mark.parametrize("variant", ["v41", pytest.param("paper", marks=pytest.mark.slow)])
def test_decode_with_the_incremental_hash_state_equals_the_full_forward(variant):
    """Engram's rows hashed on the host: the whole sequence at once (`hash_rows`, as the Grain stage
    does) for the full forward, chunk by chunk (`EngramHashState`, as generation does) for decoding.
    The paper variant's causal conv keeps its history in the layer's decode cache (its own parameters, so
    its own compiles: on the 3-layer model, whose one Engram layer has the conv)."""
    cfg, model, variables, tokens, _ = tiny(False)
    cfg = tiny_cfg(False, V41_THREE) if variant == "paper" else cfg
    cfg_e = dataclasses.replace(cfg.engram, compressed_vocab_size=cfg.vocab_size, variant=variant)
    cfg = dataclasses.replace(cfg, engram=cfg_e)
    layout, cmap = engram_layout(cfg_e), np.arange(cfg.vocab_size)  # identity map: the raw ids
    tokens = np.asarray(tokens)
    if variant == "paper":  # its own parameters; the conv starts at zero, so make it live
        variables = jax.jit(build_model(cfg).init)(jax.random.key(3), tokens[:, :8],
                                                    engram_rows=hash_rows(layout, cmap, tokens[:, :8]))
        variables = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.1 if "conv" in jax.tree_util.keystr(p) else x, variables)
    full = jax.jit(build_model(cfg).apply)(variables, tokens, engram_rows=hash_rows(layout, cmap, tokens)).logits
    state, rows = EngramHashState(layout, cmap, tokens.shape[0]), []
    start = 0
    for n in CHUNKS:
        rows.append(state.step(tokens[:, start:start + n]))
        start += n
    dec = _decode(cfg, build_model(cfg), variables, tokens, np.concatenate(rows, axis=1), CHUNKS)
    np.testing.assert_array_equal(np.concatenate(rows, axis=1), hash_rows(layout, cmap, tokens))
    assert float(jnp.abs(dec - full).max()) < 1e-4
