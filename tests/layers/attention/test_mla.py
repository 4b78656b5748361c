"""Multi-head latent attention: naive vs absorbed, vs numpy float64, masks, and the decode cache."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import MLAConfig, RopeConfig
from deepseek_jax.layers.attention.core import causal_mask
from deepseek_jax.layers.attention.latent import mla_absorbed, mla_naive
from deepseek_jax.layers.attention.mla import MLA, LatentCache
from deepseek_jax.layers.rope import yarn_inv_freq
from tests.utils import TOL, assert_close

B, T, N, H, R, O, C = 2, 7, 3, 8, 4, 6, 10


pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


def attention_inputs(seed=0):
    """q_nope, q_rope, kv_latent, k_rope, w_uk, w_uv (float32)."""
    r = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, T, N, R), (B, T, C), (B, T, R), (C, N, H), (C, N, O)]
    return [r.standard_normal(s).astype(np.float32) for s in shapes]


def np_attention(q_nope, q_rope, c, k_rope, w_uk, w_uv, mask, scale):
    """softmax((q_nope·(c W_uk) + q_rope·k_rope) * scale) (c W_uv), in float64."""
    q_nope, q_rope, c, k_rope, w_uk, w_uv = (
        a.astype(np.float64) for a in (q_nope, q_rope, c, k_rope, w_uk, w_uv)
    )
    k_nope = np.einsum("bsc,cnh->bsnh", c, w_uk)
    v = np.einsum("bsc,cno->bsno", c, w_uv)
    logits = np.einsum("btnh,bsnh->btns", q_nope, k_nope) + np.einsum(
        "btnr,bsr->btns", q_rope, k_rope
    )
    logits = np.where(np.asarray(mask)[:, :, None, :], logits * scale, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("btns,bsno->btno", probs, v)


SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["causal", "segments"])
def test_naive_matches_numpy_and_absorbed(segments):
    args = attention_inputs()
    mask = causal_mask(None if segments is None else jnp.asarray(segments), B, T)
    scale = (H + R) ** -0.5
    want = np_attention(*args, mask, scale)
    naive = jax.jit(mla_naive)(*args, mask, scale)
    absorbed = jax.jit(mla_absorbed)(*args, mask, scale)
    assert naive.shape == (B, T, N, O)
    assert_close(naive, want, **TOL["layer_f32"], what="mla_naive vs numpy")
    assert_close(absorbed, naive, **TOL["layer_f32"], what="mla_absorbed vs mla_naive")


def test_causal_mask_values():
    mask = np.asarray(causal_mask(jnp.asarray(SEGMENTS), B, T))
    want = np.array(
        [
            [[s <= t and SEGMENTS[b, s] == SEGMENTS[b, t] for s in range(T)] for t in range(T)]
            for b in range(B)
        ]
    )
    np.testing.assert_array_equal(mask, want)
    assert not mask[0, 4, 2] and mask[0, 4, 3] and mask[1, 4, 2]  # doc 1 of row 0 cannot see doc 0
    np.testing.assert_array_equal(
        np.asarray(causal_mask(None, 1, 4))[0], np.tril(np.ones((4, 4), bool))
    )


def test_segments_block_cross_document_attention():
    args = attention_inputs()
    mask = causal_mask(jnp.asarray(SEGMENTS), B, T)
    out = np.asarray(mla_naive(*args, mask, 0.3))
    # Perturb document 0 of row 0 (its latents and rope keys): document 1's outputs must not move.
    perturbed = [a.copy() for a in args]
    perturbed[2][0, :3] += 5.0
    perturbed[3][0, :3] -= 5.0
    out2 = np.asarray(mla_naive(*perturbed, mask, 0.3))
    np.testing.assert_array_equal(out2[0, 3:], out[0, 3:])
    assert np.abs(out2[0, :3] - out[0, :3]).max() > 1e-2  # the perturbation is seen where allowed
    plain = np.asarray(mla_naive(*perturbed, causal_mask(None, B, T), 0.3))
    assert np.abs(plain[0, 3:] - out[0, 3:]).max() > 1e-2  # and without segments it leaks


# ----------------------------------------------------------------------------------------------
# The MLA module

D, MAX_LEN = 16, 16
ROPE = RopeConfig(rope_factor=4.0, original_seq_len=8, mscale=1.0, mscale_all_dim=0.8)


def mla_config(q_lora_rank):
    return MLAConfig(
        n_heads=2,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    )


def np_rms(x, scale, eps=1e-6):
    return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def np_rope(x, positions, inv_freq, scale):
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * scale * np.exp(1j * positions[..., None] * inv_freq)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def np_mla_module(p, cfg, x, positions, mask):
    """HF DeepseekV3Attention semantics in float64: rope cos/sin carry mscale/mscale_all_dim, the
    softmax scale carries mscale_all_dim^2. Returns (out [B,T,D], kv_latent, rotated k_rope)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = x.astype(np.float64)
    Hd = cfg.qk_nope_head_dim
    if cfg.q_lora_rank:
        q = np.einsum("btq,qnk->btnk", np_rms(x @ p["w_dq"], p["q_norm"]["scale"]), p["w_uq"])
    else:
        q = np.einsum("btd,dnk->btnk", x, p["w_q"])
    kv = x @ p["w_dkv"]
    c = np_rms(kv[..., : cfg.kv_lora_rank], p["kv_norm"]["scale"])
    inv_freq = yarn_inv_freq(4, ROPE.rope_theta, ROPE.rope_factor, ROPE.original_seq_len).astype(
        np.float64
    )
    f = ROPE.rope_factor
    m_rope, m_all = 0.1 * np.log(f) * ROPE.mscale + 1, 0.1 * np.log(f) * ROPE.mscale_all_dim + 1
    positions = positions.astype(np.float64)
    q_rope = np_rope(q[..., Hd:], positions[:, :, None], inv_freq, m_rope / m_all)
    k_rope = np_rope(kv[..., cfg.kv_lora_rank :], positions, inv_freq, m_rope / m_all)
    scale = cfg.qk_head_dim**-0.5 * m_all**2
    out = np_attention(q[..., :Hd], q_rope, c, k_rope, p["w_uk"], p["w_uv"], mask, scale)
    return np.einsum("btno,nod->btd", out, p["w_o"]), c, k_rope


@pytest.fixture(scope="module", params=[8, 0], ids=["q_lora", "q_full"])
def module_setup(request):
    cfg = mla_config(request.param)
    mla = MLA(cfg, ROPE, D, dtype=jnp.float32)
    r = np.random.default_rng(1)
    x = r.standard_normal((B, 12, D)).astype(np.float32)
    positions = np.broadcast_to(np.arange(12), (B, 12))
    shapes = nn.unbox(jax.eval_shape(mla.init, jax.random.key(0), x, positions))["params"]
    # random parameters from the declared shapes (no init compile); norm scales are random too,
    # so a norm wired to the wrong tensor cannot hide behind ones
    params = {
        name: {"scale": (1 + 0.3 * r.standard_normal(a["scale"].shape)).astype(np.float32)}
        if isinstance(a, dict)
        else (
            r.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[: 2 if name == "w_o" else 1]))
        ).astype(np.float32)
        for name, a in shapes.items()
    }
    return cfg, mla, params, x, positions


def test_module_param_shapes(module_setup):
    cfg, _, params, _, _ = module_setup
    shapes = jax.tree.map(lambda a: a.shape, params)
    N_, K = cfg.n_heads, cfg.qk_head_dim
    want = {
        "w_dkv": (D, 8 + 4),
        "kv_norm": {"scale": (8,)},
        "w_uk": (8, N_, 8),
        "w_uv": (8, N_, 6),
        "w_o": (N_, 6, D),
    }
    if cfg.q_lora_rank:
        want |= {"w_dq": (D, 8), "q_norm": {"scale": (8,)}, "w_uq": (8, N_, K)}
    else:
        want |= {"w_q": (D, N_, K)}
    assert shapes == want


def test_module_matches_numpy(module_setup):
    cfg, mla, params, x, positions = module_setup
    out, cache, kl = jax.jit(mla.apply)({"params": params}, x, positions)
    assert cache is None and kl is None
    want, _, _ = np_mla_module(params, cfg, x, positions, np.asarray(causal_mask(None, B, 12)))
    assert_close(out, want, **TOL["layer_f32"], what="MLA module vs numpy")


def test_absorbed_training_form_matches_numpy_and_naive_grads(module_setup):
    """mla.train_form=absorbed (latent keys; at these widths W_uq·W_ukᵀ and W_uv·W_o are merged,
    latent.merge_cheaper) computes the naive form's function: output vs numpy, gradients vs naive."""
    cfg, _, params, x, positions = module_setup
    want, _, _ = np_mla_module(params, cfg, x, positions, np.asarray(causal_mask(None, B, 12)))
    grads = {}
    for form in ("naive", "absorbed"):
        mla = MLA(dataclasses.replace(cfg, train_form=form), ROPE, D, dtype=jnp.float32)
        out = jax.jit(mla.apply)({"params": params}, x, positions)[0]
        assert_close(out, want, **TOL["layer_f32"], what=f"MLA train_form={form} vs numpy")
        loss = lambda p: (mla.apply({"params": p}, x, positions)[0] ** 2).sum()  # noqa: E731
        grads[form] = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads["absorbed"]):
        ref = dict(jax.tree_util.tree_leaves_with_path(grads["naive"]))[path]
        assert_close(g, ref, **TOL["layer_f32"], what=f"grad {jax.tree_util.keystr(path)} absorbed vs naive")
    assert not MLAConfig(n_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128).absorbed_training  # V3: naive
    assert MLAConfig(n_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128).absorbed_training  # deepseek3-tiny


@jax.jit
def _empty_cache(x):
    return LatentCache(
        jnp.zeros((B, MAX_LEN, 8), jnp.float32), jnp.zeros((B, MAX_LEN, 4), jnp.float32)
    )


def test_chunked_prefill_equals_full_forward(module_setup):
    cfg, mla, params, x, positions = module_setup
    full, _, _ = jax.jit(mla.apply)({"params": params}, x, positions)

    @jax.jit
    def step(x_chunk, pos_chunk, cache, index):  # index is traced: one program per chunk length
        return mla.apply({"params": params}, x_chunk, pos_chunk, cache=cache, cache_index=index)[:2]

    cache, outs, start = _empty_cache(x), [], 0
    for size in (5, 1, 6):
        stop = start + size
        out, cache = step(x[:, start:stop], positions[:, start:stop], cache, jnp.int32(start))
        outs.append(out)
        start = stop
    assert_close(jnp.concatenate(outs, axis=1), full, **TOL["layer_f32"], what="chunked vs full")

    # The cache holds C + R numbers per token: the normed latent and the rotated shared rope key.
    assert isinstance(cache, LatentCache)
    assert cache.kv_latent.shape == (B, MAX_LEN, cfg.kv_lora_rank)
    assert cache.k_rope.shape == (B, MAX_LEN, cfg.qk_rope_head_dim)
    assert cache.index_k is None  # no indexer, no indexer keys
    assert sum(a.size for a in jax.tree.leaves(cache)) == B * MAX_LEN * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim
    )
    _, c_want, k_rope_want = np_mla_module(params, cfg, x, positions, causal_mask(None, B, 12))
    assert_close(cache.kv_latent[:, :12], c_want, **TOL["layer_f32"], what="cached latents")
    assert_close(cache.k_rope[:, :12], k_rope_want, **TOL["layer_f32"], what="cached rope keys")
    assert (
        not np.asarray(cache.kv_latent[:, 12:]).any() and not np.asarray(cache.k_rope[:, 12:]).any()
    )


def test_packed_documents_equal_separate_documents(module_setup):
    """Two documents packed in one row (segment ids, positions restarting) = each run alone."""
    _, mla, params, x, _ = module_setup
    apply = jax.jit(mla.apply)
    segments = np.array([[0] * 5 + [1] * 7] * B)
    positions = np.array([list(range(5)) + list(range(7))] * B)
    packed, _, _ = apply({"params": params}, x, positions, segments)
    first, _, _ = apply({"params": params}, x[:, :5], positions[:, :5])
    second, _, _ = apply({"params": params}, x[:, 5:], positions[:, 5:])
    assert_close(
        packed, jnp.concatenate([first, second], 1), **TOL["layer_f32"], what="packed docs"
    )


def test_index_loss_without_indexer_raises(module_setup):
    """A module raises on an argument it cannot honour: no indexer, no indexer KL."""
    _, mla, params, x, positions = module_setup
    with pytest.raises(ValueError, match="index_loss=True needs the DSA indexer"):
        mla.apply({"params": params}, x, positions, index_loss=True)
