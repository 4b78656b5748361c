"""V4 attention with no [T, T/m] array (v4_stream.py, indexer.entry_picks / entry_kl, compressor's document
rules) against dense references: float64 numpy for outputs and the indexer KL, the released dense JAX
formulas (all visible entries as gathered slots, a whole [T, Z] score array) for gradients and top-k picks
(exactly), then the layer: streamed (small k_block, q_block) == one chunk, chunked decode == full forward,
the KL trains only the indexer, and a packed row equals each document run alone.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import RopeConfig, V4AttentionConfig, load_model_config
from deepseek_jax.layers.attention import V4Attention, init_v4_attention_cache
from deepseek_jax.layers.attention import v4 as v4_module
from deepseek_jax.layers.attention.compressor import entry_segments
from deepseek_jax.layers.attention.core import visible_entries
from deepseek_jax.layers.attention.indexer import entry_picks, index_scores, select_entries, select_topk
from deepseek_jax.layers.attention.v4 import sink_attention, window_slots
from deepseek_jax.layers.attention.v4_stream import csa_attention, hca_attention
from deepseek_jax.models import build_model
from tests.utils import CONFIGS, TINY_V4_OVERRIDES, TOL, assert_close, assert_close_to_scale

pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py

B, T, N, X, W = 2, 29, 3, 8, 5  # W = window
P, Y = 2, 6  # indexer heads, dim


def _inputs(m: int, seed: int = 0, docs: bool = False):
    """Random q [B,T,N,X], window source [B,T,X], entries [B,Z,X], sink, positions, window slots and the
    query / source / entry segment ids (packed documents with unaligned boundaries when docs)."""
    rng = np.random.default_rng(seed)
    Z = (m - 1 + T) // m + 1  # the compressor's block count for a full forward
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, src, ent, sink = f(B, T, N, X), f(B, T, X), f(B, Z, X), f(N)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    slots = jnp.broadcast_to(window_slots(T, W, 0, 0), (B, T, W))
    seg = np.ones((B, T), np.int32)
    if docs:
        seg[0, 7:] = 2
        seg[0, 19:] = 3
        seg[1, 12:] = 2
        seg[1, 26:] = 0  # padding at the end of row 1
    seg = jnp.asarray(seg)
    eseg = entry_segments(seg, m, Z) if docs else jnp.ones((B, Z), jnp.int32)
    return dict(q=q, src=src, ent=ent, sink=sink, pos=pos, slots=slots, seg=seg, eseg=eseg)


def _reference_f64(d, m, picks=None):
    """float64 numpy: (out [B,T,N,X], probs [B,T,N,W+Z or W+U]) of the sink softmax over the window keys
    (same document) and the visible entries (all, or the picks), every rule written out per (b, t)."""
    q, src, ent = (np.asarray(d[k], np.float64) for k in ("q", "src", "ent"))
    sink, seg, eseg, slots = np.asarray(d["sink"], np.float64), np.asarray(d["seg"]), np.asarray(d["eseg"]), \
        np.asarray(d["slots"])
    Z = ent.shape[1]
    U = W + (Z if picks is None else picks.shape[-1])
    out, probs = np.zeros((B, T, N, X)), np.zeros((B, T, N, U))
    for b in range(B):
        for t in range(T):
            keys, ok = [], []
            for s in slots[b, t]:
                keys.append(src[b, max(s, 0)])
                ok.append(s >= 0 and seg[b, s] == seg[b, t])
            for z in (range(Z) if picks is None else picks[b, t]):
                keys.append(ent[b, max(z, 0)])
                ok.append(z >= 0 and (z + 1) * m <= t + 1 and eseg[b, z] == seg[b, t])
            k, ok = np.stack(keys), np.array(ok)
            s = np.where(ok[None], q[b, t] @ k.T / np.sqrt(X), -np.inf)
            mx = np.maximum(s.max(-1, keepdims=True), sink[:, None])
            e = np.exp(s - mx)
            p = e / (e.sum(-1, keepdims=True) + np.exp(sink[:, None] - mx))
            probs[b, t], out[b, t] = p, p @ k
    return out, probs


def _dense_jax(d, m):
    """The released formulas: every visible entry as a gathered slot of [window source | entries]."""
    Z = d["ent"].shape[1]
    vis = visible_entries(d["pos"], Z, m) & (d["eseg"][:, None, :] == d["seg"][:, :, None])
    wslots = jnp.where(jnp.take_along_axis(d["seg"][:, None, :], jnp.maximum(d["slots"], 0), 2)
                       == d["seg"][:, :, None], d["slots"], -1)
    slots = jnp.concatenate([wslots, jnp.where(vis, T + jnp.arange(Z), -1)], axis=-1)
    return lambda q, src, ent, sink: sink_attention(q, jnp.concatenate([src, ent], 1), slots, sink, X**-0.5)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("k_block", [0, 2, 3])
def test_hca_stream_matches_f64_and_dense_grads(k_block, docs):
    m = 3
    d = _inputs(m, seed=1, docs=docs)
    fn = lambda q, src, ent, sink: hca_attention(  # noqa: E731
        q, d["slots"], d["pos"], d["seg"], src, d["seg"], ent, d["eseg"], sink_N=sink, scale=X**-0.5, m=m,
        k_block=k_block)
    args = (d["q"], d["src"], d["ent"], d["sink"])
    got = jax.jit(fn)(*args)
    assert_close(got, _reference_f64(d, m)[0], **TOL["layer_f32"], what=f"HCA k_block {k_block} vs f64")
    dense = _dense_jax(d, m)
    r = jax.random.normal(jax.random.key(0), got.shape)
    grads = [jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * r), argnums=(0, 1, 2, 3)))(*args)  # noqa: B023
             for f in (fn, dense)]
    for name, g, w in zip(("q", "source", "entries", "sink"), *grads):
        assert_close_to_scale(g, w, 2e-6, what=f"HCA grad {name}")


def _index_inputs(seed=2):
    rng = np.random.default_rng(seed)
    Z = (3 + T) // 4 + 1
    return (jnp.asarray(rng.standard_normal((B, T, P, Y)), jnp.float32),
            jnp.asarray(rng.random((B, T, P)), jnp.float32), jnp.asarray(rng.standard_normal((B, Z, Y)), jnp.float32))


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("k_block", [0, 2, 5])
def test_csa_picks_exact_and_kl_matches_f64(k_block, docs):
    """Streamed picks == lax.top_k over a whole [T, Z] array (ties included: a duplicated key); the output
    and the indexer KL vs float64 numpy on those picks."""
    topk = 3
    d = _inputs(4, seed=3, docs=docs)
    iq, iw, ik = _index_inputs()
    ik = ik.at[:, 5].set(ik[:, 2])  # an exact tie between entries 2 and 5: the lower slot must win
    Z = ik.shape[1]
    vis = visible_entries(d["pos"], Z, 4) & (d["eseg"][:, None, :] == d["seg"][:, :, None])
    idx, valid = select_topk(index_scores(iq, ik, iw, vis), vis, topk)
    want = np.asarray(jnp.where(valid, idx, -1))
    picks = entry_picks(iq, iw, ik, d["pos"], d["seg"], d["eseg"], topk=topk, k_block=k_block)
    np.testing.assert_array_equal(np.asarray(picks), want)
    if not docs:
        np.testing.assert_array_equal(want, np.asarray(select_entries(iq, ik, iw, d["pos"], 4, topk)))
    out, picks2, kl = jax.jit(lambda: csa_attention(
        d["q"], d["slots"], d["pos"], d["seg"], iq, iw, d["src"], d["seg"], d["ent"], d["eseg"], ik,
        sink_N=d["sink"], scale=X**-0.5, topk=topk, k_block=k_block, with_loss=True))()
    np.testing.assert_array_equal(np.asarray(picks2), want)
    ref_out, ref_probs = _reference_f64(d, 4, picks=want)
    assert_close(out, ref_out, **TOL["layer_f32"], what="CSA output vs f64")
    # KL(p ‖ softmax I) on the picks: p = the attention's mass on each pick, heads summed, renormalised
    iq64, iw64, ik64 = (np.asarray(a, np.float64) for a in (iq, iw, ik))
    scores = np.einsum("btp,btpz->btz", iw64, np.maximum(np.einsum("btpy,bzy->btpz", iq64, ik64), 0))
    ref_kl = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            sel = [u for u in range(topk) if want[b, t, u] >= 0]
            if not sel:
                continue
            p = ref_probs[b, t, :, W:].sum(0)[sel]
            p = p / p.sum()
            s = scores[b, t, want[b, t, sel]]
            logq = s - s.max() - np.log(np.exp(s - s.max()).sum())
            ref_kl[b, t] = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0) - p * logq)
    assert_close(kl, ref_kl, **TOL["layer_f32"], what="CSA indexer KL vs f64")
    assert float(np.max(ref_kl)) > 1e-3  # a non-trivial target


def test_entry_segments_rule():
    """Entry z has a document only if its whole block (CSA: and block z − 1) lies in it."""
    seg = np.array([[1] * 6 + [2] * 9 + [0] * 3], np.int32)  # T = 18
    for m in (3, 4):
        Z = (m - 1 + 18) // m + 1
        got = np.asarray(entry_segments(jnp.asarray(seg), m, Z))[0]
        want = []
        for z in range(Z):
            toks = list(range(z * m - (m if m == 4 and z > 0 else 0), z * m + m))
            vals = {int(seg[0, i]) if i < 18 else -1 for i in toks}
            want.append(vals.pop() if len(vals) == 1 else -1)
        np.testing.assert_array_equal(got, want, err_msg=f"m={m}")


# ----------------------------------------------------------------------------------------------
# The layer

D, TL = 32, 40
CFG = V4AttentionConfig(
    n_heads=4, head_dim=16, rope_head_dim=4, q_lora_rank=12, o_groups=2, o_lora_rank=8, window_size=6,
    index_n_heads=2, index_head_dim=8, index_topk=3,
)  # fmt: skip
ROPE = RopeConfig(rope_theta=160000.0, rope_factor=4.0, original_seq_len=16, beta_fast=32.0, beta_slow=1.0)


def _layer(ratio, **over):
    return V4Attention(dataclasses.replace(CFG, **over), ROPE, ratio, D, 1e-6, jnp.float32)


def _params(ratio, seed=0):
    x = jnp.zeros((1, TL, D))
    p = nn.unbox(_layer(ratio).init(jax.random.key(seed), x, jnp.zeros((1, TL), jnp.int32))["params"])
    rng = np.random.default_rng(seed)  # random non-zero sinks / ape: every term live
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.5, jnp.float32), p)


X_IN = jnp.asarray(np.random.default_rng(5).standard_normal((B, TL, D)), jnp.float32)
POS = jnp.broadcast_to(jnp.arange(TL), (B, TL))


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [4, 5])
def test_layer_streamed_equals_one_chunk_and_decode(ratio):
    """k_block 3 + q_block 7 vs 0/0: outputs, picks exactly, gradients; then cached chunks (13, 9, 1 × 18)
    with k_block 3 give the full forward."""
    params = _params(ratio)
    base, small = _layer(ratio, k_block=0), _layer(ratio, k_block=3, q_block=7)
    r = jax.random.normal(jax.random.key(1), (B, TL, D))

    def run(model):
        def loss(p, x):
            (out, _), inter = model.apply({"params": p}, x, POS, mutable="intermediates")
            return jnp.sum(out * r), (out, inter.get("intermediates", {}).get("index_topk_BTU"))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, X_IN)

    (_, (out0, picks0)), g0 = run(base)
    (_, (out1, picks1)), g1 = run(small)
    assert_close(out1, out0, **TOL["resharded_f32"], what=f"ratio {ratio} streamed vs one chunk")
    if ratio == 4:
        np.testing.assert_array_equal(np.asarray(picks1[0]), np.asarray(picks0[0]))
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: assert_close_to_scale(a, b, 1e-5, what=f"grad {jax.tree_util.keystr(path)}"), g1, g0)
    step = jax.jit(lambda p, x, pos, c, i: small.apply({"params": p}, x, pos, c, i))
    cache, outs, start = init_v4_attention_cache(small.cfg, ratio, B, TL + 3), [], 0
    for n in [13, 9] + [1] * (TL - 22):
        out, cache = step(params, X_IN[:, start:start + n], POS[:, start:start + n], cache, jnp.int32(start))
        outs.append(out)
        start += n
    assert_close(jnp.concatenate(outs, 1), out0, **TOL["model_f32"], what=f"ratio {ratio} decode vs forward")


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [4, 5])
def test_cache_shorter_than_a_block(ratio):
    """A cache of fewer than m slots holds no entries (Z = 0): decoding runs on the window alone."""
    params, model = _params(ratio), _layer(ratio, k_block=2)
    cache = init_v4_attention_cache(model.cfg, ratio, B, 3)
    got, _ = model.apply({"params": params}, X_IN[:, :3], POS[:, :3], cache, 0)
    want, _ = model.apply({"params": params}, X_IN[:, :3], POS[:, :3])
    assert_close(got, want, **TOL["model_f32"], what=f"ratio {ratio}: 3-slot cache vs forward")


@pytest.mark.slow
def test_index_loss_trains_only_the_indexer():
    """index_loss=True returns the mean per-token KL over real tokens; its gradient reaches only the
    indexer's parameters, and the output's gradient never does (the indexer's inputs are detached)."""
    params = _params(4)
    model = _layer(4, k_block=3)
    seg = jnp.asarray(np.r_[np.ones(TL - 4), np.zeros(4)].astype(np.int32))[None].repeat(B, 0)
    fwd = lambda p: model.apply({"params": p}, X_IN, POS, None, 0, seg, True)  # noqa: E731
    kl, g_kl = jax.jit(jax.value_and_grad(lambda p: fwd(p)[2]))(params)
    assert kl.shape == () and float(kl) > 0
    g_out = jax.jit(jax.grad(lambda p: jnp.sum(fwd(p)[0])))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(g_kl):
        if "indexer" not in jax.tree_util.keystr(path):
            assert float(jnp.abs(g).max()) == 0, jax.tree_util.keystr(path)
    for name in ("w_uq", "w_weights"):
        assert float(jnp.abs(g_kl["indexer"][name]).max()) > 0, name
    assert float(jnp.abs(g_kl["indexer"]["compressor"]["w_kv"]).max()) > 0
    for path, g in jax.tree_util.tree_leaves_with_path(g_out["indexer"]):
        assert float(jnp.abs(g).max()) == 0, jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match="CSA"):
        _layer(5).apply({"params": _params(5)}, X_IN, POS, None, 0, seg, True)


@pytest.mark.slow
def test_index_loss_means_over_real_queries_that_picked(monkeypatch):
    """The layer's CSA KL is the float64 mean of its per-token KL over real (segment > 0) queries that
    picked an entry: the first m − 1 tokens (no complete block yet, KL 0) and padding stay out of the
    denominator. The per-token KL and mask are read where the layer averages them (v4.mean_over_tokens)."""
    seen, mean = [], v4_module.mean_over_tokens
    monkeypatch.setattr(v4_module, "mean_over_tokens", lambda kl, mask: seen.append((kl, mask)) or mean(kl, mask))
    seg = np.r_[[1] * 17, [2] * (TL - 21), [0] * 4].astype(np.int32)[None].repeat(B, 0)
    (_, _, kl), inter = _layer(4, k_block=3).apply({"params": _params(4)}, X_IN, POS, None, 0, jnp.asarray(seg), True,
                                                   mutable="intermediates")  # fmt: skip
    picked = (np.asarray(inter["intermediates"]["index_topk_BTU"][0]) >= 0).any(-1)
    kl_BT, mask_BT = (np.asarray(a) for a in seen[0])
    want_mask = picked & (seg > 0)
    np.testing.assert_array_equal(mask_BT, want_mask)
    assert not picked[:, :3].any() and want_mask[:, 3:TL - 4].any() and (kl_BT[~picked] == 0).all()
    want = kl_BT.astype(np.float64)[want_mask].sum() / want_mask.sum()
    np.testing.assert_allclose(float(kl), want, rtol=1e-6)
    assert float(kl) > kl_BT.astype(np.float64)[seg > 0].mean()  # the unpicked rows' zeros no longer count


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0, 5])
def test_packed_row_equals_documents_alone(ratio):
    """Documents packed at block-aligned slots (0, 15, 30 for m = 5) give each document's output alone
    (RoPE is relative, entries are rotated at their block start); with document_mask false they differ."""
    params = _params(ratio)
    model, released = _layer(ratio, k_block=2), _layer(ratio, k_block=2, document_mask=False)
    bounds = [0, 15, 30, TL]
    seg = np.zeros((B, TL), np.int32)
    for i in range(3):
        seg[:, bounds[i]:bounds[i + 1]] = i + 1
    packed = model.apply({"params": params}, X_IN, POS, segment_ids_BT=jnp.asarray(seg))[0]
    crossed = released.apply({"params": params}, X_IN, POS, segment_ids_BT=jnp.asarray(seg))[0]
    for i in range(3):
        a, b = bounds[i], bounds[i + 1]
        alone = model.apply({"params": params}, X_IN[:, a:b], POS[:, : b - a])[0]
        assert_close(packed[:, a:b], alone, **TOL["model_f32"], what=f"ratio {ratio} document {i}")
    assert float(jnp.abs(crossed[:, 15:] - packed[:, 15:]).max()) > 1e-3  # released: keys cross documents


@pytest.mark.slow
def test_decoder_returns_csa_index_loss(tiny_v4_model):
    """index_loss=True on a V4 model: ModelOutput.index_loss holds one KL per CSA layer (tiny_v4: 2);
    the KL ignores padding (segment 0): it equals the KL of the row cut before its padding; and V4.1
    models (shared-KV indexers) refuse the flag."""
    cfg, model, variables, tokens = tiny_v4_model
    seg = jnp.ones(tokens.shape, jnp.int32).at[:, -5:].set(0)
    fwd = jax.jit(lambda v, t, s: model.apply(v, t, segment_ids_BT=s, index_loss=True, mtp=False))
    out, cut = fwd(variables, tokens, seg), fwd(variables, tokens[:, :-5], seg[:, :-5])
    assert out.index_loss.shape == (2,) and bool(jnp.all(out.index_loss > 0)), out.index_loss
    assert_close(out.index_loss, cut.index_loss, **TOL["resharded_f32"], what="padded vs cut rows' CSA KL")
    v41 = load_model_config([CONFIGS / "model/tiny_v41.yaml"])
    with pytest.raises(ValueError, match="index_loss=True needs"):
        rows = None if v41.engram is None else jnp.zeros((*tokens.shape, *v41.engram.rows_shape), jnp.int32)
        build_model(v41).check_call(None, None, True, rows, tokens.shape)


@pytest.fixture(scope="module")
def tiny_v4_model():
    cfg = load_model_config([CONFIGS / "model/tiny_v4.yaml"], TINY_V4_OVERRIDES)
    model = build_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    return cfg, model, nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :8])), tokens
