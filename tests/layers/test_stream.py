"""stream.py against dense references in float64 numpy: online softmax (with and without a sink, merged
partial states, skipped chunks) and the running top-k, which must pick exactly what one top_k picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers.attention import stream


def _dense(q, k, v, visible, sink=None):
    s = np.einsum("tnx,sx->tns", q, k)
    s = np.where(visible[:, None, :], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    if sink is not None:
        m = np.maximum(m, sink[None, :, None])
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    if sink is not None:
        den = den + np.exp(sink[None, :, None] - m)
    return np.einsum("tns,sx->tnx", e / np.maximum(den, 1e-300), v)


@pytest.mark.parametrize("k_block", [0, 5, 16, 64])
@pytest.mark.parametrize("with_sink", [False, True])
def test_flash_matches_dense(k_block, with_sink):
    rng = np.random.default_rng(0)
    T, S, N, X = 7, 37, 3, 8
    q, k = rng.normal(size=(T, N, X)), rng.normal(size=(S, X))
    visible = rng.random((T, S)) < 0.5
    visible[0] = False  # a row with nothing visible: 0 without a sink, 0 with one too (acc is 0)
    sink = rng.normal(size=N) if with_sink else None
    keys = (jnp.asarray(k, jnp.float32)[None], jnp.asarray(visible.T)[None])
    qj = jnp.asarray(q, jnp.float32)[None]
    out, _ = stream.flash_attention(
        lambda k_KX, vis_KT: jnp.einsum("btnx,bkx->btnk", qj, k_KX),
        lambda p, k_KX, vis_KT: jnp.einsum("btnk,bkx->btnx", p, k_KX),
        lambda s_K, live_K, k_KX, vis_KT: (jnp.swapaxes(vis_KT, 1, 2) & live_K)[:, :, None, :],
        k_block, keys, (1, T, N), X, sink_N=None if sink is None else jnp.asarray(sink, jnp.float32),
    )
    np.testing.assert_allclose(np.asarray(out[0]), _dense(q, k, k, visible, sink), atol=2e-6)


def test_merge_of_two_key_sets_equals_one_pass():
    rng = np.random.default_rng(1)
    T, S, N, X = 4, 20, 2, 6
    q, k = jnp.asarray(rng.normal(size=(T, N, X)), jnp.float32), jnp.asarray(rng.normal(size=(S, X)), jnp.float32)
    sink = jnp.asarray(rng.normal(size=N), jnp.float32)
    logits = jnp.einsum("tnx,sx->tns", q, k)
    pv = lambda ks: lambda p: jnp.einsum("tns,sx->tnx", p, ks)  # noqa: E731
    whole = stream.add(stream.start((T, N), X, sink), logits, True, pv(k))
    a = stream.add(stream.start((T, N), X, sink), logits[..., :7], True, pv(k[:7]))
    b = stream.add(stream.start((T, N), X), logits[..., 7:], True, pv(k[7:]))
    np.testing.assert_allclose(stream.finish(stream.merge(a, b), sink)[0], stream.finish(whole, sink)[0], atol=1e-6)
    np.testing.assert_allclose(stream.finish(stream.merge(a, b), sink)[1], stream.finish(whole, sink)[1], atol=1e-5)


@pytest.mark.parametrize("k_block", [3, 8, 50])
def test_running_topk_equals_one_topk_with_ties(k_block):
    rng = np.random.default_rng(2)
    T, S, U = 9, 41, 6
    scores = rng.integers(0, 5, size=(T, S)).astype(np.float32)  # many ties
    visible = rng.random((T, S)) < 0.6
    visible[1] = False
    visible[2, :3] = True
    visible[2, 3:] = False  # fewer visible keys than U
    keys = (jnp.asarray(scores.T)[None], jnp.asarray(visible.T)[None])

    def score_chunk(s_K, live_K, sc_KT, vis_KT):
        return jnp.where(jnp.swapaxes(vis_KT, 1, 2), jnp.swapaxes(sc_KT, 1, 2), -jnp.inf)

    got = np.asarray(stream.running_topk(score_chunk, U, k_block, keys, (1, T))[0])
    _, ref = jax.lax.top_k(jnp.where(visible, scores, -1e30), U)
    ref = np.where(np.take_along_axis(visible, np.asarray(ref), -1), np.asarray(ref), -1)
    np.testing.assert_array_equal(got, ref)


def test_skipped_chunks_and_gradients():
    rng = np.random.default_rng(3)
    T, S, N, X = 6, 24, 2, 4
    q, k = jnp.asarray(rng.normal(size=(1, T, N, X)), jnp.float32), jnp.asarray(rng.normal(size=(1, S, X)), jnp.float32)
    pos_T = jnp.arange(T) * 2  # queries at 0, 2, …, 10: chunks past 10 are never needed

    def attend(q, k, k_block, needed):
        out, _ = stream.flash_attention(
            lambda k_KX: jnp.einsum("btnx,bkx->btnk", q, k_KX),
            lambda p, k_KX: jnp.einsum("btnk,bkx->btnx", p, k_KX),
            lambda s_K, live_K, k_KX: ((s_K[None, :] <= pos_T[:, None]) & live_K)[None, :, None, :],
            k_block, (k,), (1, T, N), X, needed=needed,
        )
        return out

    needed = lambda s_K: s_K[0] <= pos_T.max()  # noqa: E731
    loss = lambda q, k, kb, nd: jnp.sum(jnp.sin(attend(q, k, kb, nd)))  # noqa: E731
    ref = jax.grad(loss, argnums=(0, 1))(q, k, 0, None)
    got = jax.grad(loss, argnums=(0, 1))(q, k, 4, needed)
    np.testing.assert_allclose(attend(q, k, 4, needed), attend(q, k, 0, None), atol=1e-6)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-6)
