"""Losses vs numpy float64 references: chunked cross-entropy (values, grads, memory), k-hop
targets on a packed row. The routing statistics are tested with the router (test_moe.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.losses import auto_chunk_tokens, chunked_cross_entropy, next_token_targets, token_nll


def ce_inputs(M=37, D=16, V=50, seed=0):
    rng = np.random.default_rng(seed)
    h_MD = rng.normal(size=(M, D)).astype(np.float32)
    w_DV = rng.normal(size=(D, V)).astype(np.float32) / np.sqrt(D)
    targets_M = rng.integers(0, V, size=M).astype(np.int32)
    mask_M = rng.random(M) < 0.8
    targets_M[~mask_M] = -1  # masked slots may hold an invalid id
    return h_MD, w_DV, targets_M, mask_M


def numpy_ce(h_MD, w_DV, targets_M, mask_M):
    logits = h_MD.astype(np.float64) @ w_DV.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    nll = lse - logits[np.arange(len(targets_M)), np.maximum(targets_M, 0)]
    return (nll * mask_M).sum(), mask_M.sum()


def direct_mean_ce(h_MD, w_DV, targets_M, mask_M):
    """The obvious version: full [M, V] logits."""
    nll_M = token_nll(h_MD, w_DV, jnp.where(mask_M, targets_M, 0))
    return jnp.where(mask_M, nll_M, 0.0).sum() / mask_M.sum()


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_chunked_ce_matches_full_logits(chunk):
    h, w, t, m = ce_inputs()
    want_sum, want_n = numpy_ce(h, w, t, m)
    got_sum, got_n = jax.jit(chunked_cross_entropy, static_argnums=4)(h, w, t, m, chunk)
    np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)
    assert float(got_n) == want_n

    def chunked_mean(h, w):
        s, n = chunked_cross_entropy(h, w, t, m, chunk)
        return s / n

    got = jax.jit(jax.grad(chunked_mean, argnums=(0, 1)))(h, w)
    want = jax.jit(jax.grad(lambda h, w: direct_mean_ce(h, w, t, m), argnums=(0, 1)))(h, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_fused_ce_gradients_in_bf16():
    """The fused loss's gradients (formed in the forward pass) for bf16 inputs agree with the plain
    autodiff of the full-logit loss at bf16 resolution, and scale with the incoming cotangent."""
    h, w, t, m = ce_inputs()
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = jax.jit(jax.grad(lambda h, w: 3.0 * chunked_cross_entropy(h, w, t, m, 8)[0], argnums=(0, 1)))(hb, wb)
    want = jax.jit(jax.grad(lambda h, w: 3.0 * direct_mean_ce(h, w, t, m) * m.sum(), argnums=(0, 1)))(h, w)
    for g, r, ref_dtype in zip(got, want, (hb.dtype, wb.dtype)):
        assert g.dtype == ref_dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2, atol=2e-2 * np.abs(r).max())


def test_auto_chunk_tokens():
    assert auto_chunk_tokens(129280) == 512  # 2^26 logits at most per chunk
    assert auto_chunk_tokens(2048) == 32768
    assert auto_chunk_tokens(10**9) == 8
    assert auto_chunk_tokens(129280, batch_shards=8) == 4096  # fewer [D, V] all-reduces over devices


def all_shapes(jaxpr):
    """Shapes of every value in a jaxpr, recursing into scan/checkpoint/jit bodies."""
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_shapes(inner)


def test_chunked_ce_never_holds_full_logits():
    M, U, D, V = 4096, 512, 32, 8192  # M = 8 chunks; an [M, V] f32 array is 128 MiB
    args = (
        jax.ShapeDtypeStruct((M, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((M,), jnp.int32), jax.ShapeDtypeStruct((M,), jnp.bool_),
    )

    def chunked_mean(h, w, t, m):
        s, n = chunked_cross_entropy(h, w, t, m, U)
        return s / n

    grad_chunked = jax.value_and_grad(chunked_mean, argnums=(0, 1))
    grad_direct = jax.value_and_grad(direct_mean_ce, argnums=(0, 1))
    biggest = max(np.prod(s) for s in all_shapes(jax.make_jaxpr(grad_chunked)(*args).jaxpr))
    assert biggest == U * V, biggest  # a chunk's logits, never M·V
    full = M * V * 4
    chunked_temp = jax.jit(grad_chunked).lower(*args).compile().memory_analysis().temp_size_in_bytes
    direct_temp = jax.jit(grad_direct).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert chunked_temp < full / 2, chunked_temp  # measured: 32 MiB = 2 chunks of [U, V] f32
    assert direct_temp >= full, direct_temp  # measured: 256 MiB


def test_next_token_targets_on_a_packed_row():
    # two documents [1 2 3 4] [5 6 7] then padding; loss_mask[t]: token t+1 continues t's document
    tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 0, 0]])
    loss_mask = jnp.array([[1, 1, 1, 0, 1, 1, 0, 0, 0]], bool)
    targets, valid = next_token_targets(tokens, loss_mask, k=1)  # the main loss
    np.testing.assert_array_equal(targets[0], [2, 3, 4, 5, 6, 7, 0, 0, 0])
    np.testing.assert_array_equal(valid[0], [1, 1, 1, 0, 1, 1, 0, 0, 0])
    targets, valid = next_token_targets(tokens, loss_mask, k=2)  # MTP depth 1: t predicts t+2
    np.testing.assert_array_equal(targets[0], [3, 4, 5, 6, 7, 0, 0, 0, 0])
    np.testing.assert_array_equal(valid[0], [1, 1, 0, 0, 1, 0, 0, 0, 0])
    _, valid = next_token_targets(jnp.arange(5)[None], jnp.ones((1, 5), bool), k=2)
    np.testing.assert_array_equal(valid[0], [1, 1, 1, 0, 0])  # the row's end is never a target
