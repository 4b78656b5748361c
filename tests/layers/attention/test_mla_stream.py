"""MLA and V3.2 DSA with no [T, S] array: query blocks × key chunks with an online softmax (latent.py,
dsa.py) against the whole-mask oracles (mla_naive / mla_absorbed / select_topk / indexer_kl with
causal_mask / cache_mask, the code the streamed path replaced) and numpy float64; the fused-kernel
wrapper (run with implementation="xla": no GPU here) and its error off GPU; block-size configs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, IndexerConfig, MLAConfig, load_config
from deepseek_jax.layers.attention.core import cache_mask, causal_mask, masked_softmax, over_query_blocks
from deepseek_jax.layers.attention.dsa import dense_warmup, dsa_attention
from deepseek_jax.layers.attention.indexer import index_scores, indexer_kl, select_topk
from deepseek_jax.layers.attention.latent import (
    kernel_attention,
    key_positions,
    latent_logits,
    mla_absorbed,
    mla_naive,
    mla_sparse,
    mla_streamed,
    naive_keys,
    use_kernel,
)
from deepseek_jax.layers.attention.mla import MLA, init_mla_cache
from deepseek_jax.sharding import activate, make_mesh, rules
from tests.layers.attention.test_dsa import MLA_CFG, ROPE, SMALL_D, index_cfg, random_params
from tests.layers.attention.test_mla import np_attention
from tests.utils import ROOT, TOL, assert_close, assert_close_to_scale

B, T, N, H, R, O, C, P, Y = 2, 23, 3, 8, 4, 6, 10, 2, 8
SEGMENTS = np.array([[1] * 9 + [2] * 14, [1] * 23])  # row 0 packs two documents
Q_BLOCK, K_BLOCK = 8, 5  # 23 queries: 3 blocks (ragged last); 23 keys: 5 chunks (ragged last)
GRAD_RTOL = 1e-5  # gradients: max |Δ| <= GRAD_RTOL * max |want| (chunk sums reorder f32 adds)

pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


def inputs(seed=0, S=T):
    """q_nope, q_rope, kv_latent, k_rope, w_uk, w_uv, index q, index w, index k (float32)."""
    r = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, T, N, R), (B, S, C), (B, S, R), (C, N, H), (C, N, O), (B, T, P, Y), (B, T, P),
              (B, S, Y)]  # fmt: skip
    return [r.standard_normal(s).astype(np.float32) for s in shapes]


def streamed(q_nope, q_rope, kv, k_rope, w_uk, w_uv, pos, *, absorbed, q_block=Q_BLOCK, k_block=K_BLOCK):
    """The layer's dense path: naive keys (or latent ones) as `keys`, query blocks × key chunks."""
    keys = (kv, k_rope) if absorbed else (*naive_keys(kv, w_uk, w_uv), k_rope)

    def fn(qn, qr, slot, doc, *k):
        return mla_streamed((qn, qr), (slot, doc), k, (w_uk, w_uv), 0.3, k_block, absorbed=absorbed)

    return over_query_blocks(fn, q_block, q_nope, q_rope, *pos[:2], keys=(*keys, pos[2]))


def train_pos(segments):
    return key_positions(B, T, T, None if segments is None else jnp.asarray(segments), False, 0, None)


def train_mask(segments):
    return causal_mask(None if segments is None else jnp.asarray(segments), B, T)


# ----------------------------------------------------------------------------------------------
# Dense MLA, streamed vs the whole-mask oracle


@pytest.mark.parametrize("absorbed", [False, True], ids=["naive", "absorbed"])
@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["causal", "packed"])
def test_streamed_equals_masked_oracle_forward_and_grads(absorbed, segments):
    args = inputs()[:6]
    pos, mask = train_pos(segments), train_mask(segments)
    oracle = mla_absorbed if absorbed else mla_naive
    r = np.random.default_rng(1).standard_normal((B, T, N, O)).astype(np.float32)
    got_fn = jax.jit(lambda *a: streamed(*a, pos, absorbed=absorbed))
    want_fn = jax.jit(lambda *a: oracle(*a, mask, 0.3))
    got, want = got_fn(*args), want_fn(*args)
    assert_close(got, want, **TOL["layer_f32"], what="streamed vs masked oracle")
    assert_close(got, np_attention(*args, mask, 0.3), **TOL["layer_f32"], what="streamed vs numpy f64")
    g_got = jax.jit(jax.grad(lambda *a: jnp.sum(got_fn(*a) * r), argnums=tuple(range(6))))(*args)
    g_want = jax.jit(jax.grad(lambda *a: jnp.sum(want_fn(*a) * r), argnums=tuple(range(6))))(*args)
    names = ("q_nope", "q_rope", "kv_latent", "k_rope", "w_uk", "w_uv")
    for name, a, b in zip(names, g_got, g_want):
        assert_close_to_scale(a, b, rtol=GRAD_RTOL, what=f"d/d{name}")


def test_block_sizes_only_bound_memory():
    """Any q block / k block (whole, one, ragged) gives the one-block one-chunk result."""
    args, pos = inputs()[:6], train_pos(SEGMENTS)
    want = streamed(*args, pos, absorbed=False, q_block=0, k_block=0)
    for qb, kb in ((1, 1), (23, 4), (5, 23), (7, 30)):
        got = jax.jit(lambda *a, qb=qb, kb=kb: streamed(*a, pos, absorbed=False, q_block=qb, k_block=kb))(*args)
        assert_close(got, want, **TOL["layer_f32"], what=f"q_block {qb}, k_block {kb}")


def test_cache_rule_equals_cache_mask():
    """Decoding: T queries at slots cache_index + t over S > T cache slots, left padding before
    start_B: the streamed rule = cache_mask; a row with no visible key gives 0, not NaN."""
    S, index = 40, 11
    args = inputs(3, S=S)[:6]
    start_B = jnp.array([0, 5])
    pos = key_positions(B, T, S, None, True, jnp.int32(index), start_B)
    got = jax.jit(lambda *a: streamed(*a, pos, absorbed=True))(*args)
    want = mla_absorbed(*args, cache_mask(B, T, S, index, start_B), 0.3)
    assert_close(got, want, **TOL["layer_f32"], what="cache rule vs cache_mask")
    none = key_positions(B, T, S, None, True, 0, jnp.array([0, 30]))  # row 1: queries 0..22 see nothing
    out = np.asarray(jax.jit(lambda *a: streamed(*a, none, absorbed=True))(*args))
    assert np.isfinite(out).all() and not out[1].any()


def test_future_key_chunks_are_skipped():
    """A chunk wholly after a block's last query slot is not walked: NaN keys there change nothing
    (a walked-but-masked chunk would turn 0·NaN into NaN in the value sum)."""
    args = inputs()[:6]
    args[2] = args[2].copy()
    args[2][:, 20:] = np.nan  # keys 20..22: the last chunk (slots 20..24) of the first two blocks
    out = np.asarray(streamed(*args, train_pos(None), absorbed=True, q_block=8, k_block=5))
    assert np.isfinite(out[:, :16]).all()


# ----------------------------------------------------------------------------------------------
# The fused-kernel wrapper


@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["causal", "packed"])
def test_kernel_wrapper_numerics_with_xla(segments):
    """Everything but the kernel choice: head concat, zero-padding of v (O = 6 < H + R = 12),
    causal flag and the segment mask; implementation="xla" stands in for cudnn."""
    q_nope, q_rope, kv, k_rope, w_uk, w_uv = inputs()[:6]
    k_nope, v = naive_keys(kv, w_uk, w_uv)
    seg = None if segments is None else jnp.asarray(segments)
    got = jax.jit(kernel_attention, static_argnums=6)((q_nope, q_rope), k_nope, v, k_rope, seg, 0.3, "xla")
    want = mla_naive(q_nope, q_rope, kv, k_rope, w_uk, w_uv, train_mask(segments), 0.3)
    assert got.shape == (B, T, N, O)
    assert_close(got, want, **TOL["layer_f32"], what="dot_product_attention wrapper vs oracle")


def test_cudnn_off_gpu_is_a_config_error():
    if jax.default_backend() == "gpu":
        pytest.skip("this backend has a GPU")
    x = np.zeros((1, 4, SMALL_D), np.float32)
    model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.bfloat16, attention_impl="cudnn")
    with pytest.raises(ConfigError, match="model.attention_impl=cudnn needs an NVIDIA GPU"):
        jax.eval_shape(model.init, jax.random.key(0), x, np.arange(4)[None])


def test_cudnn_config_streams_packed_documents_decoding_and_context_splits():
    """attention_impl cudnn takes the kernel only for an unpacked, uncached forward with no context
    split (latent.use_kernel): with segment ids or a cache it runs the streamed path, here on CPU too,
    and gives the xla config's output exactly; under the cp mesh it never asks for the kernel."""
    x = np.random.default_rng(3).standard_normal((1, 6, SMALL_D)).astype(np.float32)
    pos, seg = np.arange(6)[None], np.array([[1, 1, 1, 2, 2, 2]])
    xla = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32)
    cudnn = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, attention_impl="cudnn")
    v = {"params": random_params(xla, x, pos)}
    cache = init_mla_cache(MLA_CFG, None, 1, 8, jnp.float32)
    for kw in ({"segment_ids_BT": seg}, {"cache": cache, "cache_index": jnp.int32(0)}):
        got, want = cudnn.apply(v, x, pos, **kw)[0], xla.apply(v, x, pos, **kw)[0]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(list(kw)))
    assert use_kernel("cudnn", segmented=False, cached=False, indexed=False)
    assert not use_kernel("xla", segmented=False, cached=False, indexed=False)
    cp = load_config([ROOT / "configs/model/tiny.yaml", ROOT / "configs/mesh/cp.yaml"]).mesh
    with activate(make_mesh(cp), rules(cp)):
        assert not use_kernel("cudnn", segmented=False, cached=False, indexed=False)
    with pytest.raises(ConfigError, match="model.attention_impl must be xla or cudnn"):
        use_kernel("flash", segmented=True, cached=False, indexed=False)


def test_block_configs_are_checked():
    with pytest.raises(ConfigError, match="mla.k_block must be >= 0"):
        dataclasses.replace(MLA_CFG, k_block=-1)
    with pytest.raises(ConfigError, match="mla.q_block must be >= 0"):
        dataclasses.replace(MLA_CFG, q_block=-2)


# ----------------------------------------------------------------------------------------------
# DSA: streamed top-k, sparse attention and both KL losses vs the whole-array code


def dsa_run(args, pos, *, topk, dense, q_block=Q_BLOCK, k_block=K_BLOCK):
    """(out, picks or None, KL) of the layer's DSA path on raw arrays, blocks × chunks."""
    q_nope, q_rope, kv, k_rope, w_uk, w_uv, iq, iw, ik = args
    keys = (*naive_keys(kv, w_uk, w_uv), k_rope, ik) if dense else (kv, k_rope, ik)

    def fn(*a):
        return dsa_attention(*a, w_ukv=(w_uk, w_uv), scale=0.3, topk=topk, k_block=k_block, dense=dense,
                             with_loss=True)  # fmt: skip

    return over_query_blocks(fn, q_block, q_nope, q_rope, iq, iw, *pos[:2], keys=(*keys, pos[2]))


def whole_sparse(args, mask, topk):
    """The replaced code: whole [B, T, S] scores, select_topk, mla_sparse, indexer_loss_sparse."""
    q_nope, q_rope, kv, k_rope, w_uk, w_uv, iq, iw, ik = args
    scores = index_scores(iq, ik, iw, mask)
    idx, valid = select_topk(scores, mask, topk)
    out, probs = mla_sparse(q_nope, q_rope, kv, k_rope, w_uk, w_uv, idx, valid, 0.3)
    kl = indexer_kl(probs, jnp.take_along_axis(scores, idx, -1), valid)
    return out, jnp.where(valid, idx, -1), kl


@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["causal", "packed"])
def test_dsa_sparse_equals_whole_array_code(segments):
    args, pos, mask = inputs(4), train_pos(segments), train_mask(segments)
    topk = 6
    scores = np.asarray(index_scores(*(args[i] for i in (6, 8, 7)), mask))
    s = np.sort(np.where(mask, scores, -np.inf), -1)[..., ::-1]
    rows = np.asarray(mask).sum(-1) > topk
    gap = s[rows][:, topk - 1] - s[rows][:, topk]  # exact ties (all heads ReLU'd to 0) are fine
    assert gap[gap != 0].min() > 1e-4 and (s[rows][gap == 0, topk] == 0).all(), "input near a top-k tie"
    out, idx, kl = jax.jit(lambda *a: dsa_run(a, pos, topk=topk, dense=False))(*args)
    out_w, idx_w, kl_w = jax.jit(lambda *a: whole_sparse(a, mask, topk))(*args)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_w), -1))
    assert_close(out, out_w, **TOL["layer_f32"], what="sparse out vs whole-array code")
    assert_close(kl, kl_w, **TOL["layer_f32"], what="sparse KL vs whole-array code")
    # the KL's gradients reach the indexer's q, w and k as before (via scores_at, not a [T, S] gather)
    grads = [jax.jit(jax.grad(lambda iq, iw, ik, f=f: jnp.sum(f(*args[:6], iq, iw, ik)[2]), (0, 1, 2)))(*args[6:])
             for f in (lambda *a: dsa_run(a, pos, topk=topk, dense=False), lambda *a: whole_sparse(a, mask, topk))]
    for name, a, b in zip(("q", "w", "k"), *grads):
        assert_close_to_scale(a, b, rtol=GRAD_RTOL, what=f"d KL / d index {name}")


def test_dsa_ties_pick_the_lower_slot_as_select_topk():
    """All indexer keys equal: every visible key ties; both pick the lowest visible slots."""
    args = inputs(5)
    args[8] = np.broadcast_to(args[8][:, :1], args[8].shape).copy()
    pos, mask = train_pos(SEGMENTS), train_mask(SEGMENTS)
    _, idx, _ = jax.jit(lambda *a: dsa_run(a, pos, topk=4, dense=False))(*args)
    _, idx_w, _ = whole_sparse(args, mask, 4)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_w))


@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["causal", "packed"])
def test_dense_warmup_kl_equals_indexer_kl(segments):
    """Two passes over key chunks = KL(p ‖ softmax(I)) over all visible keys with whole arrays
    (p from the latent logits, as the replaced code): value and gradients in the indexer's q, w, k."""
    args, pos, mask = inputs(6), train_pos(segments), train_mask(segments)

    def whole(*a):
        q_nope, q_rope, kv, k_rope, w_uk, w_uv, iq, iw, ik = a
        probs = masked_softmax(latent_logits(q_nope, q_rope, w_uk, kv, k_rope, 0.3), mask)
        out = mla_naive(q_nope, q_rope, kv, k_rope, w_uk, w_uv, mask, 0.3)
        return out, None, indexer_kl(probs, index_scores(iq, ik, iw, mask), mask)

    out, idx, kl = jax.jit(lambda *a: dsa_run(a, pos, topk=4, dense=True))(*args)
    out_w, _, kl_w = jax.jit(whole)(*args)
    assert idx is None
    assert_close(out, out_w, **TOL["layer_f32"], what="dense warm-up out vs mla_naive")
    assert_close(kl, kl_w, **TOL["layer_f32"], what="streamed dense KL vs indexer_kl")
    grads = [jax.jit(jax.grad(lambda iq, iw, ik, f=f: jnp.sum(f(*args[:6], iq, iw, ik)[2]), (0, 1, 2)))(*args[6:])
             for f in (lambda *a: dsa_run(a, pos, topk=4, dense=True), whole)]
    for name, a, b in zip(("q", "w", "k"), *grads):
        assert_close_to_scale(a, b, rtol=GRAD_RTOL, what=f"d KL / d index {name}")


def test_dense_warmup_kl_target_has_no_gradient():
    args, pos = inputs(7), train_pos(None)
    q_nope, q_rope, kv, k_rope, w_uk, w_uv, iq, iw, ik = args
    keys = (*naive_keys(kv, w_uk, w_uv), k_rope, ik, pos[2])

    def kl(q_nope, q_rope):
        return jnp.sum(dense_warmup((q_nope, q_rope), (iq, iw), pos[:2], keys, 0.3, k_block=K_BLOCK)[1])

    g = jax.grad(kl, (0, 1))(q_nope, q_rope)
    assert not any(np.asarray(a).any() for a in g)


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [False, True], ids=["sparse", "dense_warmup"])
def test_dsa_module_blocks_do_not_change_math(warmup):
    """The layer with q_block 5 × k_block 5 (ragged both) = one block, one chunk: out, KL, picks,
    and every parameter's gradient."""
    r = np.random.default_rng(2)
    x = r.standard_normal((B, 12, SMALL_D)).astype(np.float32)
    positions, cot = np.broadcast_to(np.arange(12), (B, 12)), r.standard_normal((B, 12, SMALL_D))
    segments = np.array([[1] * 5 + [2] * 7, [1] * 12])

    def run(qb, kb):
        mla = dataclasses.replace(MLA_CFG, q_block=qb, k_block=kb)
        model = MLA(mla, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(4, index_dense_warmup=warmup))
        params = random_params(model, x, positions)

        def loss(p):
            (out, _, kl), inter = model.apply({"params": p}, x, positions, segments, index_loss=True, mutable=True)
            picks = inter.get("intermediates", {}).get("index_topk_BTU", (None,))[0]
            return jnp.sum(out * cot) + kl, (out, kl, picks)

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g_want, (out_want, kl_want, picks_want) = run(0, 0)
    g, (out, kl, picks) = run(5, 5)
    assert_close(out, out_want, **TOL["layer_f32"], what="out")
    assert_close(kl, kl_want, **TOL["layer_f32"], what="kl")
    if not warmup:
        np.testing.assert_array_equal(np.asarray(picks), np.asarray(picks_want))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_want)):
        assert_close_to_scale(a, b, rtol=GRAD_RTOL, what=f"grad {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------------------------
# No [T, T] array in the lowered program (T = 8192; the repo-wide scan is tests/test_no_quadratic.py)


def quadratic_shapes(hlo: str) -> set[str]:
    """The tensor types in StableHLO text with two dims >= 4096."""
    found = set()
    for m in re.finditer(r"tensor<([0-9x]+)x[a-z]", hlo):
        if sum(int(d) >= 4096 for d in m.group(1).split("x") if d) >= 2:
            found.add(m.group(0))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mla", "dsa", "dsa_warmup"])
def test_no_quadratic_tensor_at_8192(kind):
    T_, D_ = 8192, 32
    cfg = MLAConfig(n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, q_block=256, k_block=512)  # fmt: skip
    index = None if kind == "mla" else IndexerConfig(index_n_heads=2, index_head_dim=8, index_topk=64,
                                                      index_dense_warmup=kind == "dsa_warmup")  # fmt: skip
    model = MLA(cfg, ROPE, D_, dtype=jnp.bfloat16, index=index)
    x, pos = jax.ShapeDtypeStruct((1, T_, D_), jnp.bfloat16), jax.ShapeDtypeStruct((1, T_), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, pos)["params"]

    def loss(p, x, pos):  # packed documents: segment ids = positions (every token its own document)
        (out, _, kl), _ = model.apply({"params": p}, x, pos, pos, index_loss=index is not None, mutable=True)
        return jnp.sum(out.astype(jnp.float32)) + (0.0 if kl is None else kl)

    assert not quadratic_shapes(jax.jit(jax.grad(loss)).lower(params, x, pos).as_text())
    cache = jax.eval_shape(lambda: init_mla_cache(cfg, index, 1, T_, jnp.bfloat16))

    def prefill(p, x, pos, cache):
        return model.apply({"params": p}, x, pos, cache=cache, cache_index=jnp.int32(0),
                           cache_start_B=jnp.zeros((1,), jnp.int32), mutable=True)[0][:2]  # fmt: skip

    assert not quadratic_shapes(jax.jit(prefill).lower(params, x, pos, cache).as_text())
    # the detector sees the replaced whole-mask code's [T, T] arrays
    assert quadratic_shapes(jax.jit(lambda m: causal_mask(None, 1, T_) & m).lower(True).as_text())
