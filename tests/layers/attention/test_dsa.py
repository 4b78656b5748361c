"""DeepSeek Sparse Attention (V3.2): the indexer and sparse MLA vs HF transformers' DeepseekV32
modules, sparse = dense MLA when top-k covers every key, masks and the decode cache, and the
indexer KL losses vs numpy float64 (with the sparse stage's stop-gradient)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, IndexerConfig, MLAConfig, RopeConfig
from deepseek_jax.layers.attention.core import causal_mask
from deepseek_jax.layers.attention.indexer import (
    DSAIndexer,
    index_scores,
    indexer_loss_dense,
    indexer_loss_sparse,
    select_topk,
)
from deepseek_jax.layers.attention.mla import MLA, LatentCache
from deepseek_jax.layers.rope import apply_rope_half, rope_cos_sin, yarn_inv_freq, yarn_mscale
from tests.utils import TOL, assert_close

B, T, D = 2, 24, 64
SEGMENTS = np.array([[1] * 10 + [2] * 14, [1] * 24])  # row 0 packs two documents
POSITIONS = {
    "causal": np.broadcast_to(np.arange(T), (B, T)).copy(),
    "segments": np.array([list(range(10)) + list(range(14)), list(range(24))]),
}
MIN_MARGIN = 1e-4  # top-k cut gap the selection tests require; fp32 noise in the scores is ~1e-6


pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


def visible(segments) -> np.ndarray:
    return np.asarray(causal_mask(None if segments is None else jnp.asarray(segments), B, T))


def topk_margin(scores_BTS, mask_BTS, k) -> float:
    """Smallest gap between the k-th and (k+1)-th visible score over rows with more than k keys."""
    s = np.sort(np.where(mask_BTS, scores_BTS, -np.inf), -1)[..., ::-1]
    rows = mask_BTS.sum(-1) > k
    return float((s[rows][:, k - 1] - s[rows][:, k]).min())


# ----------------------------------------------------------------------------------------------
# Parity with HF transformers' DeepseekV32Attention / DeepseekV32Indexer


@pytest.fixture(scope="module")
def hf_pair():
    hv = pytest.importorskip("tests.parity.hf_v32_reference")
    hf_cfg = hv.tiny_v32_config()
    attn, config = hv.build_hf_attention(hf_cfg, seed=0)
    mla, rope, index = hv.our_configs(hf_cfg)
    params = jax.tree.map(np.ascontiguousarray, hv.params_from_hf(hv.hf_tensors(attn), mla, index))
    x = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
    hf = {
        name: hv.hf_attention_forward(attn, config, x, POSITIONS[name], segs)
        for name, segs in (("causal", None), ("segments", SEGMENTS))
    }
    return hv, attn, config, mla, rope, index, params, x, hf


def run_sparse(mla, rope, index, params, x, positions, segments=None, **kw):
    model = MLA(mla, rope, D, dtype=jnp.float32, index=index)
    fn = jax.jit(lambda p, x, pos, seg: model.apply({"params": p}, x, pos, seg, **kw, mutable=True))
    (out, _, kl), inter = fn(params, x, positions, segments)
    return out, kl, inter


@pytest.mark.parity
@pytest.mark.parametrize("case", ["causal", "segments"])
def test_indexer_scores_and_selection_match_hf(hf_pair, case):
    *_, mla, rope, index, params, x, hf = hf_pair
    _, hf_idx, hf_scores, c_q = hf[case]
    segments = SEGMENTS if case == "segments" else None
    mask = visible(segments)
    # our scores: the indexer module on HF's query latent, then the pure scoring function
    inv_freq = yarn_inv_freq(
        mla.qk_rope_head_dim, rope.rope_theta, rope.rope_factor, rope.original_seq_len,
        rope.beta_fast, rope.beta_slow,
    )  # fmt: skip
    cos_scale = yarn_mscale(rope.rope_factor, rope.mscale) / yarn_mscale(
        rope.rope_factor, rope.mscale_all_dim
    )
    cos, sin = rope_cos_sin(jnp.asarray(POSITIONS[case]), inv_freq, cos_scale)
    iq, ik, iw = DSAIndexer(index, D, mla.q_lora_rank, jnp.float32).apply(
        {"params": params["indexer"]}, x, c_q, cos, sin
    )
    _, _, inter = run_sparse(mla, rope, index, params, x, POSITIONS[case], segments)
    scores = np.asarray(index_scores(iq, ik, iw, mask))
    assert_close(np.where(mask, scores, 0), np.where(mask, hf_scores, 0), **TOL["layer_f32"],
                 what="indexer scores vs HF")  # fmt: skip
    margin = topk_margin(hf_scores, mask, index.index_topk)
    assert margin > MIN_MARGIN, f"test input too close to a top-k tie: margin {margin:.2e}"

    ours = np.asarray(inter["intermediates"]["index_topk_BTU"][0])  # -1 = no visible key
    assert ours.shape == hf_idx.shape == (B, T, index.index_topk)
    for b in range(B):
        for t in range(T):
            want = sorted(s for s in hf_idx[b, t] if mask[b, t, s])  # HF fills with masked keys
            assert sorted(s for s in ours[b, t] if s >= 0) == want, (b, t)


@pytest.mark.parity
@pytest.mark.parametrize("case", ["causal", "segments"])
def test_sparse_attention_matches_hf(hf_pair, case):
    *_, mla, rope, index, params, x, hf = hf_pair
    hf_out = hf[case][0]
    segments = SEGMENTS if case == "segments" else None
    out, kl, _ = run_sparse(mla, rope, index, params, x, POSITIONS[case], segments)
    assert kl is None
    err = np.abs(np.asarray(out) - hf_out).max()
    print(f"\n{case}: max|Δ| sparse MLA vs HF {err:.2e} (max|out| {np.abs(hf_out).max():.2f})")
    assert_close(out, hf_out, **TOL["layer_f32"], what="MLA + DSA vs HF DeepseekV32Attention")
    # sparsity is live: dense attention gives another answer on the rows with > top-k keys
    dense = IndexerConfig(index_n_heads=8, index_head_dim=16, index_topk=T)
    out_dense, _, _ = run_sparse(mla, rope, dense, params, x, POSITIONS[case], segments)
    assert np.abs(np.asarray(out_dense)[:, 16:] - hf_out[:, 16:]).max() > 1e-2


@pytest.mark.parity
def test_sparse_attention_gradients_match_hf(hf_pair):
    """d(Σ out·r)/dx and /dparams through the gathered keys = HF's autograd through its mask
    (HF's indexer runs under no_grad; ours has its inputs detached: same gradients)."""
    hv, attn, config, mla, rope, index, params, x, _ = hf_pair
    torch = hv.torch
    r = np.random.default_rng(5).standard_normal((B, T, D)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    pos = torch.from_numpy(POSITIONS["causal"]).long()
    attn.zero_grad()
    out, _ = attn(xt, hv.hf_v32.DeepseekV32RotaryEmbedding(config)(xt, pos), hv.hf_mask(B, T))
    (out * torch.from_numpy(r)).sum().backward()

    model = MLA(mla, rope, D, dtype=jnp.float32, index=index)

    def loss(p, x):
        out = model.apply({"params": p}, x, POSITIONS["causal"], mutable=["intermediates"])[0][0]
        return jnp.sum(out * r)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert_close(g_x, xt.grad.numpy(), **TOL["layer_f32"], what="d/dx vs HF")
    want = hv.params_from_hf(hv.hf_tensors(attn, grad=True), mla, index)
    for (path, got), w in zip(jax.tree_util.tree_leaves_with_path(g_params), jax.tree.leaves(want)):
        assert_close(got, w, **TOL["layer_f32"], what=f"d/d{jax.tree_util.keystr(path)} vs HF")
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(g_params["indexer"]))  # no gradient


# ----------------------------------------------------------------------------------------------
# Our own variants: sparse vs dense MLA, masks, packed documents, decode cache

MLA_CFG = MLAConfig(
    n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
)
ROPE = RopeConfig(rope_factor=4.0, original_seq_len=8, mscale=1.0, mscale_all_dim=0.8)
SMALL_D, SMALL_T = 16, 12


def index_cfg(topk, **kw):
    return IndexerConfig(index_n_heads=4, index_head_dim=8, index_topk=topk, **kw)


def random_params(model, x, positions, seed=1):
    """Random params from the declared shapes (no init compile); norm scales and biases random."""
    r = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, positions))["params"]

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            base = 0.0 if name.endswith("['bias']") else 1.0
            return (base + 0.3 * r.standard_normal(a.shape)).astype(np.float32)
        fan_in = np.prod(a.shape[:2]) if name.endswith("['w_o']") else a.shape[0]
        return (r.standard_normal(a.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def small():
    r = np.random.default_rng(2)
    x = r.standard_normal((B, SMALL_T, SMALL_D)).astype(np.float32)
    positions = np.broadcast_to(np.arange(SMALL_T), (B, SMALL_T)).copy()
    model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(4))
    return x, positions, random_params(model, x, positions)


def test_params_are_mla_plus_indexer(small):
    x, positions, _ = small
    model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(4))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, positions)["params"]
    mla_shapes = nn.unbox(
        jax.eval_shape(MLA(MLA_CFG, ROPE, SMALL_D).init, jax.random.key(0), x, positions)
    )["params"]
    ours = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
    assert {k: v for k, v in ours.items() if k != "indexer"} == jax.tree.map(
        lambda a: a.shape, mla_shapes
    )
    assert ours["indexer"] == {
        "w_uq": (8, 4, 8), "w_k": (SMALL_D, 8), "w_weights": (SMALL_D, 4),
        "k_norm": {"scale": (8,), "bias": (8,)},
    }  # fmt: skip
    axes = jax.tree.map(tuple, nn.get_partition_spec(boxed)["indexer"])
    assert axes == {
        "w_uq": ("q_latent", "heads", "head_dim"), "w_k": ("embed", "head_dim"),
        "w_weights": ("embed", "heads"), "k_norm": {"scale": ("head_dim",), "bias": ("head_dim",)},
    }  # fmt: skip


@pytest.mark.parametrize("segments", [None, "packed"])
def test_sparse_equals_dense_mla_when_topk_covers_all(small, segments):
    x, positions, params = small
    segs = None if segments is None else np.array([[1] * 5 + [2] * 7] * B)
    dense_params = {k: v for k, v in params.items() if k != "indexer"}
    want, _, _ = jax.jit(MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32).apply)(
        {"params": dense_params}, x, positions, segs
    )
    for topk in (SMALL_T, 4 * SMALL_T):
        model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(topk))
        (got, _, _), _ = jax.jit(
            lambda p, model=model: model.apply({"params": p}, x, positions, segs, mutable=True)
        )(params)
        assert_close(got, want, **TOL["layer_f32"], what=f"sparse (topk {topk}) vs dense MLA")


def test_selection_respects_mask():
    r = np.random.default_rng(3)
    q, k, w = (
        r.standard_normal(s).astype(np.float32) for s in ((B, T, 3, 8), (B, T, 8), (B, T, 3))
    )
    mask = visible(SEGMENTS)
    idx, valid = select_topk(index_scores(q, k, w, mask), mask, 8)
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert idx.shape == (B, T, 8)
    gathered = np.take_along_axis(mask, idx, -1)
    np.testing.assert_array_equal(valid, gathered)  # flags say exactly which picks are visible
    np.testing.assert_array_equal(
        valid.sum(-1), np.minimum(mask.sum(-1), 8)
    )  # every visible key up to U
    assert (mask[0, 10:, :10] == 0).all() and not np.isin(
        idx[0, 10:][valid[0, 10:]], range(10)
    ).any()


def test_packed_documents_equal_separate_documents(small):
    x, _, params = small
    model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(4))
    apply = jax.jit(
        lambda p, x, pos, seg: model.apply({"params": p}, x, pos, seg, mutable=True)[0][0]
    )
    segs = np.array([[1] * 5 + [2] * 7] * B)
    positions = np.array([list(range(5)) + list(range(7))] * B)
    packed = apply(params, x, positions, segs)
    first = apply(params, x[:, :5], positions[:, :5], None)
    second = apply(params, x[:, 5:], positions[:, 5:], None)
    assert_close(
        packed, jnp.concatenate([first, second], 1), **TOL["layer_f32"], what="packed docs"
    )


def test_chunked_prefill_and_decode_equal_full_forward(small):
    x, positions, params = small
    model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(4))
    full = jax.jit(
        lambda p, model=model: model.apply({"params": p}, x, positions, mutable=True)[0][0]
    )(params)

    @jax.jit
    def step(x_chunk, pos_chunk, cache, index):
        (out, cache, _), _ = model.apply(
            {"params": params}, x_chunk, pos_chunk, cache=cache, cache_index=index, mutable=True
        )
        return out, cache

    S = 16  # cache slots > tokens: empty slots must never be selected
    cache = LatentCache(*(jnp.zeros((B, S, n), jnp.float32) for n in (8, 4, 8)))
    outs, start = [], 0
    for size in (5, 1, 1, 5):
        out, cache = step(
            x[:, start : start + size], positions[:, start : start + size], cache, start
        )
        outs.append(out)
        start += size
    assert_close(jnp.concatenate(outs, 1), full, **TOL["layer_f32"], what="cached vs full")
    assert not np.asarray(cache.index_k[:, SMALL_T:]).any()


def test_bf16_compute_matches_f32(small):
    """bf16 vs f32 on rows whose top-k selection agrees (bf16 noise may flip near-tied picks)."""
    x, positions, params = small
    got = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=dtype, index=index_cfg(4))
        (out, _, _), inter = jax.jit(
            lambda p, model=model: model.apply({"params": p}, x, positions, mutable=True)
        )(params)
        got[dtype] = (
            np.asarray(out, np.float32),
            np.sort(inter["intermediates"]["index_topk_BTU"][0], -1),
        )
    (want, idx_want), (out, idx) = got[jnp.float32], got[jnp.bfloat16]
    same = (idx == idx_want).all(-1)
    assert same.mean() > 0.8, same
    assert_close(out[same], want[same], **TOL["bf16"], what="bf16 vs f32 (same selection)")


@pytest.mark.parametrize("warmup", [False, True], ids=["sparse", "dense_warmup"])
def test_query_blocks_do_not_change_math(small, warmup):
    """index_q_block only bounds memory: outputs, KL and gradients equal the one-block ones."""
    x, positions, params = small
    r = np.random.default_rng(7).standard_normal((B, SMALL_T, SMALL_D)).astype(np.float32)

    def run(block):
        ic = index_cfg(4, index_dense_warmup=warmup, index_q_block=block)
        model = MLA(MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=ic)

        def loss(p):
            (out, _, kl), _ = model.apply(
                {"params": p}, x, positions, index_loss=True, mutable=True
            )
            return jnp.sum(out * r) + kl, (out, kl)

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g_want, (out_want, kl_want) = run(0)
    for block in (5,):  # 12 queries: two blocks of 5 and a ragged, padded last one
        g, (out, kl) = run(block)
        assert_close(out, out_want, **TOL["layer_f32"], what=f"out, block {block}")
        assert_close(kl, kl_want, **TOL["layer_f32"], what=f"kl, block {block}")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_want)):
            assert_close(a, b, **TOL["layer_f32"], what=f"grad {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------------------------
# Pure functions and the indexer losses vs numpy float64


def test_apply_rope_half_matches_numpy():
    r = np.random.default_rng(4)
    x, ang = r.standard_normal((3, 8)), r.standard_normal((3, 4))
    z = (x[:, :4] + 1j * x[:, 4:]) * np.exp(1j * ang)  # halves are (real, imaginary) parts
    got = apply_rope_half(jnp.asarray(x, jnp.float32), jnp.cos(ang), jnp.sin(ang))
    assert_close(got, np.concatenate([z.real, z.imag], -1), **TOL["layer_f32"], what="rope½")


def np_kl(probs, scores, mask):
    """Σ_s p log(p / q) in float64, p = L1-normalised head-sum of probs, q = masked softmax."""
    p = np.where(mask, probs.astype(np.float64).sum(2), 0)
    p /= p.sum(-1, keepdims=True)
    s = np.where(mask, scores.astype(np.float64), -np.inf)
    log_q = s - s.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mask & (p > 0), p * (np.log(p) - log_q), 0).sum(-1)


def random_probs(r, mask, N=3):
    logits = np.where(
        mask[:, :, None], r.standard_normal(mask.shape[:2] + (N, mask.shape[-1])), -np.inf
    )
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_indexer_losses_match_numpy():
    r = np.random.default_rng(6)
    mask = visible(SEGMENTS)
    scores = (3 * r.standard_normal((B, T, T))).astype(np.float32)
    probs = random_probs(r, mask)
    got = jax.jit(indexer_loss_dense)(probs, scores, mask)
    assert_close(got, np_kl(probs, scores, mask), **TOL["layer_f32"], what="dense KL vs numpy")
    assert (np.asarray(got) >= -1e-6).all()

    idx, valid = (np.asarray(a) for a in select_topk(jnp.asarray(scores), mask, 8))
    sparse_probs = random_probs(r, valid)  # attention over the selected set, as mla_sparse gives
    want = np_kl(sparse_probs, np.take_along_axis(scores, idx, -1), valid)
    got = jax.jit(indexer_loss_sparse)(sparse_probs, scores, idx, valid)
    assert_close(got, want, **TOL["layer_f32"], what="sparse KL vs numpy")
    # the target takes no gradient; the scores do, and only at selected keys
    g_p, g_s = jax.grad(lambda p, s: indexer_loss_sparse(p, s, idx, valid).sum(), (0, 1))(
        sparse_probs, scores
    )
    assert not np.asarray(g_p).any()
    unselected = np.ones_like(mask)
    np.put_along_axis(unselected, idx, False, -1)
    assert np.asarray(g_s)[unselected].max() == 0 and np.abs(np.asarray(g_s)).max() > 0


@pytest.mark.parametrize("warmup", [False, True], ids=["sparse", "dense_warmup"])
def test_indexer_loss_gradients(small, warmup):
    """Sparse stage: the KL reaches the indexer's weights but not its input x nor MLA's weights.
    Dense warm-up: the indexer input is not detached (the rest of the model is frozen instead)."""
    x, positions, params = small
    model = MLA(
        MLA_CFG, ROPE, SMALL_D, dtype=jnp.float32, index=index_cfg(4, index_dense_warmup=warmup)
    )

    def kl(p, x):
        (_, _, kl), _ = model.apply({"params": p}, x, positions, index_loss=True, mutable=True)
        return kl

    value, (g_params, g_x) = jax.jit(jax.value_and_grad(kl, argnums=(0, 1)))(params, x)
    assert np.isfinite(value) and value > 0
    for name in ("w_uq", "w_k", "w_weights"):
        assert np.abs(np.asarray(g_params["indexer"][name])).max() > 0, name
    for name in ("w_dkv", "w_uk", "w_uv", "w_o"):  # the KL target carries no gradient
        assert not np.asarray(g_params[name]).any(), name
    assert bool(np.asarray(g_x).any()) == warmup
    assert bool(np.asarray(g_params["w_dq"]).any()) == warmup  # via the detached query latent


def test_indexer_config_checks():
    with pytest.raises(ConfigError, match="index_topk"):
        IndexerConfig(index_n_heads=4, index_head_dim=8, index_topk=0)
    with pytest.raises(ConfigError, match="even"):
        IndexerConfig(index_n_heads=4, index_head_dim=7, index_topk=2)
    cfg = IndexerConfig(index_n_heads=4, index_head_dim=8, index_topk=2)
    with pytest.raises(ConfigError, match="q_lora_rank"):
        cfg.check_against(0, 4)
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        cfg.check_against(8, 16)
