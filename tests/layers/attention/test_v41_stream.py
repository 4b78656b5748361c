"""V4.1's shared-KV indexer with no [T, Z] array (layers/attention/v41.py) against the dense functions it
replaced (kept below, verbatim in logic, as the reference):

- `pick_entries` (streamed top-k over entry chunks), `candidate_picks` (two running top-k lists: entries
  and blocks of `candidate_block_size`) and `reindex_picks` (top-k over the gathered pool only) give
  exactly the dense picks, in the same order, ties to the lower entry included (integer-grid inputs, so
  every score is exact and many tie), for prefill and decode positions, any key chunk size;
- the candidate pool (kept block ids) expands to exactly the dense [B, T, Z] pool mask;
- no traced intermediate of the streamed functions has a [T, ≥Z/2] shape (the dense one does);
- the tiny V4.1 model (cut to 5 layers that keep every picking path; qat off) with the streamed functions
  (q_block 8, index_k_block 4) equals the one with the dense functions patched in (same q_block): every
  layer's picks exactly, logits and parameter gradients within 1e-5 (measured: bitwise equal); chunked
  decode with small blocks equals the full forward (1e-4).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.layers.attention import v41
from deepseek_jax.layers.attention.core import visible_entries
from deepseek_jax.layers.attention.indexer import index_scores, select_topk
from deepseek_jax.models import build_cache, build_model
from tests.utils import ROOT, by_layer

# ----------------------------------------------------------------------------------------------
# The dense reference (v41.py before streaming): [B, T, Z] visible mask, scores and pool


def dense_block_ids(scores_BTZ, visible_BTZ, positions_BT, ratio, n_blocks, block):
    """The old `candidate_pool` up to its top-k: kept block ids [B, T, K] (−1 = none)."""
    B, T, Z = scores_BTZ.shape
    nb = -(-Z // block)
    s_BTZ = jnp.where(visible_BTZ, scores_BTZ, -jnp.inf)
    s_BTZb = jnp.pad(s_BTZ, ((0, 0), (0, 0), (0, nb * block - Z)), constant_values=-jnp.inf)
    best_BTK = jnp.max(s_BTZb.reshape(B, T, nb, block), axis=-1)
    newest_BT = (positions_BT + 1) // ratio - 1
    forced_BTK = (jnp.arange(nb) == (newest_BT // block)[..., None]) & (newest_BT >= 0)[..., None]
    best_BTK = jnp.where(forced_BTK, jnp.inf, best_BTK)
    vals_BTK, ids_BTK = jax.lax.top_k(best_BTK, min(n_blocks, nb))
    return jnp.where(vals_BTK > -jnp.inf, ids_BTK, -1)


def blocks_to_mask(blocks_BTK, Z, block):
    """[B, T, Z] bool: the entries of the kept blocks."""
    return (jnp.arange(Z)[None, None, :, None] // block == blocks_BTK[:, :, None, :]).any(-1)


def dense_pick(iq, ik, iw, positions, allowed, ratio, topk, pool=None):
    """The old `pick_entries`: (picks [B, T, U], kept block ids or None)."""
    visible = visible_entries(positions, ik.shape[1], ratio)
    scores = index_scores(iq, ik, iw, visible)
    idx, valid = select_topk(scores, visible if allowed is None else visible & allowed, topk)
    picks = jnp.where(valid, idx, -1)
    return picks, None if pool is None else dense_block_ids(scores, visible, positions, ratio, *pool)


def make(key, B, T, Z, P=4, Y=8, grid=True, offsets=(0,)):
    """Indexer inputs; grid=True: small integers, so scores are exact and tie often."""
    k1, k2, k3 = jax.random.split(key, 3)
    if grid:
        iq = jax.random.randint(k1, (B, T, P, Y), -2, 3).astype(jnp.float32)
        ik = jax.random.randint(k2, (B, Z, Y), -2, 3).astype(jnp.float32)
        iw = jax.random.randint(k3, (B, T, P), 0, 3).astype(jnp.float32)
    else:
        iq, ik = jax.random.normal(k1, (B, T, P, Y)), jax.random.normal(k2, (B, Z, Y))
        iw = jax.random.normal(k3, (B, T, P))
    positions = jnp.asarray(offsets)[:, None] + jnp.arange(T)[None, :]
    return iq, iw, jnp.broadcast_to(positions, (B, T)).astype(jnp.int32), ik


CASES = [  # ratio, T, Z, offsets (prefill from 0; a decode chunk at 30 / 41 with a cache of Z entries)
    (1, 23, 24, (0, 0)),
    (2, 23, 13, (0, 0)),
    (1, 5, 50, (30, 41)),
    (2, 3, 26, (30, 47)),
]


def jitted(fn, **kw):
    return jax.jit(functools.partial(fn, **kw))


@pytest.mark.parametrize("grid, k_block", [(True, 0), (True, 4), (True, 5), (False, 5)])
@pytest.mark.parametrize("ratio, T, Z, offsets", CASES)
def test_streamed_picks_equal_dense(ratio, T, Z, offsets, k_block, grid):
    topk, n_blocks, block = 6, 3, 4
    iq, iw, pos, ik = make(jax.random.key(ratio * 100 + T), len(offsets), T, Z, grid=grid, offsets=offsets)
    kw = dict(ratio=ratio, topk=topk, k_block=k_block)
    want, want_blocks = jax.jit(dense_pick, static_argnums=(5, 6, 7))(iq, ik, iw, pos, None, ratio, topk,
                                                                      (n_blocks, block))
    got = jitted(v41.pick_entries, **kw)(iq, iw, pos, ik)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    got_c, blocks = jitted(v41.candidate_picks, n_blocks=n_blocks, block=block, **kw)(iq, iw, pos, ik)
    np.testing.assert_array_equal(np.asarray(got_c), np.asarray(want))
    pool = np.asarray(blocks_to_mask(blocks, Z, block))
    np.testing.assert_array_equal(pool, np.asarray(blocks_to_mask(want_blocks, Z, block)))
    for row in np.asarray(blocks).reshape(-1, blocks.shape[-1]):  # ids unique
        kept = row[row >= 0]
        assert len(set(kept.tolist())) == len(kept)

    # a reindex layer (other queries, same keys) restricted to that pool
    iq2, iw2, _, _ = make(jax.random.key(7 + T), len(offsets), T, Z, grid=grid, offsets=offsets)
    want_r, _ = jax.jit(dense_pick, static_argnums=(5, 6))(iq2, ik, iw2, pos, jnp.asarray(pool), ratio, topk)
    got_r = jitted(v41.reindex_picks, block=block, **kw)(iq2, iw2, pos, blocks, ik)
    np.testing.assert_array_equal(np.asarray(got_r), np.asarray(want_r))
    if grid:  # the inputs do tie: the check above covered tie-breaking
        s = np.asarray(index_scores(iq, ik, iw, visible_entries(pos, Z, ratio)))
        assert any(len(np.unique(r[r > -1e29])) < (r > -1e29).sum() for r in s.reshape(-1, Z))


def test_a_pool_smaller_than_topk_pads_with_none():
    """(n_blocks − 1)·block + 1 < topk (the config forbids it, the function still answers): the
    reindex picks are the pool's visible entries then −1, as the dense masked top-k gives."""
    iq, iw, pos, ik = make(jax.random.key(3), 2, 9, 20, offsets=(4, 11))
    picks, blocks = v41.candidate_picks(iq, iw, pos, ik, ratio=1, topk=12, k_block=4, n_blocks=2, block=2)
    assert blocks.shape[-1] == 2
    want, _ = dense_pick(iq, ik, iw, pos, blocks_to_mask(blocks, 20, 2), 1, 12)
    got = v41.reindex_picks(iq, iw, pos, blocks, ik, ratio=1, topk=12, k_block=3, block=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_no_query_by_entry_array():
    T, Z, k_block = 32, 96, 8
    iq, iw, pos, ik = make(jax.random.key(0), 1, T, Z, Y=8, offsets=(64,))
    kw = dict(ratio=1, topk=6, k_block=k_block)
    fns = {
        "pick": lambda *a: v41.pick_entries(*a, **kw),
        "candidate": lambda *a: v41.candidate_picks(*a, n_blocks=3, block=4, **kw),
        "reindex": lambda q, w, p, k: v41.reindex_picks(q, w, p, jnp.zeros((1, T, 3), jnp.int32), k, block=4, **kw),
    }
    for name, fn in fns.items():
        shapes = list(_shapes(jax.make_jaxpr(fn)(iq, iw, pos, ik).jaxpr))
        big = [s for s in shapes if T in s and max(s) >= Z // 2]
        assert not big, f"{name}: {big}"
    dense = list(_shapes(jax.make_jaxpr(lambda *a: dense_pick(a[0], a[3], a[1], a[2], None, 1, 6))(
        iq, iw, pos, ik).jaxpr))
    assert any(T in s and Z in s for s in dense)  # the check can fail


# ----------------------------------------------------------------------------------------------
# The tiny V4.1 model: streamed vs the dense functions patched in


def _dense_pick_entries(iq, iw, pos, ik, *, ratio, topk, k_block):
    return dense_pick(iq, ik, iw, pos, None, ratio, topk)[0]


def _dense_candidate_picks(iq, iw, pos, ik, *, ratio, topk, k_block, n_blocks, block):
    return dense_pick(iq, ik, iw, pos, None, ratio, topk, pool=(n_blocks, block))


def _dense_reindex_picks(iq, iw, pos, blocks, ik, *, ratio, topk, k_block, block):
    return dense_pick(iq, ik, iw, pos, blocks_to_mask(blocks, ik.shape[1], block), ratio, topk)[0]


# the tiny V4.1 cut to 5 layers (a compile per layer kind is the tests' cost) with every picking path of
# its 9: sliding window, Engram before a ratio-2 kv and index source (`pick_entries`), the ratio-1 kv and
# candidate source (`candidate_picks`), a layer reusing its picks, and a reindex layer restricted to the
# candidate pool (`reindex_picks`). DSpark is off: it reads no picks (mtp=False below never runs it)
FIVE_LAYERS = ["model." + o for o in (
    "n_layers=5", "compress_ratios=[0,2,1,1,1]", "num_nextn_predict_layers=0", "dspark=null",
    "shared_kv.kv_source_layers=[1,2]", "shared_kv.index_source_layers=[1,2,4]", "shared_kv.candidate_source_layer=2",
    "engram.layer_ids=[1]", "engram.num_embeddings=[8214]")]


def _tiny(q_block, k_block):
    cfg = load_model_config([ROOT / "configs" / "model" / "tiny_v41.yaml"], FIVE_LAYERS)
    shared = dataclasses.replace(cfg.shared_kv, qat=False, index_k_block=k_block)
    return dataclasses.replace(cfg, vocab_size=256, shared_kv=shared,
                               v4=dataclasses.replace(cfg.v4, q_block=q_block))


def _engram_rows(cfg, T):
    """Random Engram table rows [2, T, Engram layers, columns]."""
    return jax.random.randint(jax.random.key(2), (2, T, len(cfg.engram.layer_ids), cfg.engram.n_columns), 0, 8000)


def _run(cfg, T=41):
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 256)
    rows = _engram_rows(cfg, T)
    variables = jax.jit(lambda t, r: model.init(jax.random.key(1), t, engram_rows=r, mtp=False))(tokens, rows)
    weights = jax.random.normal(jax.random.key(4), (2, T, cfg.vocab_size))

    def loss(v):
        out, state = model.apply(v, tokens, engram_rows=rows, mtp=False, mutable=["intermediates"])
        return jnp.sum(out.logits * weights), (out.logits, state["intermediates"])

    (_, (logits, inter)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    return logits, inter, grads


@pytest.mark.slow  # ~50-65 s on a busy 2-core box: two forward + backward compiles
def test_tiny_model_streamed_equals_dense(monkeypatch):
    logits, inter, grads = _run(_tiny(q_block=8, k_block=4))
    with monkeypatch.context() as m:
        m.setattr(v41, "pick_entries", _dense_pick_entries)
        m.setattr(v41, "candidate_picks", _dense_candidate_picks)
        m.setattr(v41, "reindex_picks", _dense_reindex_picks)
        cfg = _tiny(q_block=8, k_block=0)  # the same query blocks: only the picking differs
        want_logits, want_inter, want_grads = _run(cfg)
    picks, want_picks = (by_layer(i, cfg, "attn", "index_topk_BTU", 0) for i in (inter, want_inter))
    assert sorted(picks) == sorted(want_picks) == list(cfg.shared_kv.index_source_layers)
    for layer in picks:
        np.testing.assert_array_equal(np.asarray(picks[layer]), np.asarray(want_picks[layer]), err_msg=str(layer))
    reindex = np.asarray(picks[cfg.shared_kv.index_source_layers[-1]])
    assert (reindex >= 0).sum() > 0 and reindex.shape[-1] == cfg.v4.index_topk
    err = float(jnp.abs(logits - want_logits).max())
    g_err = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    print(f"tiny V4.1 streamed vs dense: max |Δlogit| {err:.1e}, max relative |Δgrad| {g_err:.1e}")
    assert err < 1e-5 and g_err < 1e-5


@pytest.mark.slow  # ~17 s on a busy 2-core box
def test_chunked_decode_with_small_blocks_equals_the_full_forward():
    cfg = _tiny(q_block=4, k_block=4)
    model = build_model(cfg)
    T = 41
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 256)
    rows = _engram_rows(cfg, T)
    variables = jax.jit(lambda t, r: model.init(jax.random.key(1), t, engram_rows=r, mtp=False))(tokens, rows)
    full = jax.jit(lambda v, t, r: model.apply(v, t, engram_rows=r, mtp=False).logits)(variables, tokens, rows)
    step = jax.jit(lambda v, t, c, i, r: model.apply(v, t, cache=c, cache_index=i, mtp=False, engram_rows=r))
    cache, start, outs = build_cache(cfg, 2, 64), 0, []
    for n in (17, 17) + (1,) * 7:  # odd chunks (a ratio-2 block pending), the second across the window: 2 compiles
        out = step(variables, tokens[:, start:start + n], cache, jnp.int32(start), rows[:, start:start + n])
        cache, start = out.cache, start + n
        outs.append(out.logits)
    err = float(jnp.abs(jnp.concatenate(outs, axis=1) - full).max())
    print(f"tiny V4.1 chunked decode (q_block 4, index_k_block 4) vs full: max |Δlogit| {err:.1e}")
    assert err < 1e-4
