"""mHC (layers/mhc.py): a numpy float64 reference of the released equations, fp32 parity (forward and
gradients) with transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead, the invariants (comb
doubly stochastic, pre and post ranges) and the degenerate settings the module docstring states."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers import mhc
from deepseek_jax.layers.mhc import HyperConnection, HyperHead
from tests.utils import TOL, assert_close

B, T, I, D = 2, 5, 4, 16
Z = (2 + I) * I
ITERS, HC_EPS, NORM_EPS = 20, 1e-6, 1e-6


pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


# ----------------------------------------------------------------------------------------------
# numpy float64 reference (upstream layout: fn [Z, I·D], flattened column i·D + d)


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_mixes(x, fn):
    xf = x.reshape(*x.shape[:-2], -1).astype(np.float64)
    r = 1 / np.sqrt(np.mean(xf**2, -1, keepdims=True) + NORM_EPS)
    return (xf @ fn.astype(np.float64).T) * r


def np_sinkhorn(logits, iters=ITERS, eps=HC_EPS):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    c = e / e.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def np_hc(x, f, fn, scale, base, n=I, eps=HC_EPS):
    """(y, post, comb, new streams) of one mHC site, float64."""
    m = np_mixes(x, fn)
    pre = np_sigmoid(m[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * np_sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = np_sinkhorn((m[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*m.shape[:-1], n, n), eps=eps)
    y = (pre[..., None] * x).sum(-2)
    new = post[..., None] * f[..., None, :] + np.einsum("btij,btid->btjd", comb, x)
    return y, post, comb, new


def np_head(x, fn, scale, base):
    w = np_sigmoid(np_mixes(x, fn) * scale[0] + base) + HC_EPS
    return (w[..., None] * x).sum(-2)


def to_ours(fn_upstream, n=I):
    """[Z, I·D] -> our fn [I, D, Z]."""
    return np.ascontiguousarray(fn_upstream.reshape(fn_upstream.shape[0], n, -1).transpose(1, 2, 0))


def random_site(seed, n=I, fn_std=0.1):
    r = np.random.default_rng(seed)
    z = (2 + n) * n
    fn = (r.standard_normal((z, n * D)) * fn_std).astype(np.float32)
    scale = r.uniform(0.5, 1.5, 3).astype(np.float32)
    base = (r.standard_normal(z) * 0.5).astype(np.float32)
    x = r.standard_normal((B, T, n, D)).astype(np.float32)
    f = r.standard_normal((B, T, D)).astype(np.float32)
    return x, f, fn, scale, base


def apply_site(x, f, fn, scale, base, n=I, eps=HC_EPS):
    """Our HyperConnection: (y, post, comb, new streams)."""
    hc = HyperConnection(n, D, ITERS, eps, NORM_EPS)
    v = {"params": {"fn": to_ours(fn, n), "scale": scale, "base": base}}

    def run(v, x, f):
        y, post, comb = hc.apply(v, x, method="hc_pre")
        return y, post, comb, hc.apply(v, f, x, post, comb, method="hc_post")

    return jax.jit(run)(v, x, f)


# ----------------------------------------------------------------------------------------------
# Equations


def test_site_matches_numpy_float64():
    x, f, fn, scale, base = random_site(0)
    got, want = apply_site(x, f, fn, scale, base), np_hc(x, f, fn, scale, base)
    for name, g, w in zip(("y", "post", "comb", "new streams"), got, want):
        assert_close(g, w, **TOL["layer_f32"], what=f"mHC {name} vs numpy f64")
        print(f"mHC {name} vs numpy f64: max abs err {np.abs(np.asarray(g, np.float64) - w).max():.2e}")
    assert got[0].dtype == got[3].dtype == jnp.float32 and got[3].shape == x.shape


def test_head_matches_numpy_float64_and_params():
    r = np.random.default_rng(1)
    x = r.standard_normal((B, T, I, D)).astype(np.float32)
    fn, scale, base = (r.standard_normal((I, I * D)) * 0.1).astype(np.float32), np.float32([0.7]), \
        r.standard_normal(I).astype(np.float32)
    got = HyperHead(I, D, HC_EPS, NORM_EPS).apply({"params": {"fn": to_ours(fn), "scale": scale, "base": base}}, x)
    assert_close(got, np_head(x, fn, scale, base), **TOL["layer_f32"], what="hc_head vs numpy f64")
    boxed = jax.eval_shape(HyperHead(I, D).init, jax.random.key(0), x)["params"]
    assert {k: (v.value.shape, v.names) for k, v in boxed.items()} == {
        "fn": ((I, D, I), (None, "embed", None)), "base": ((I,), (None,)), "scale": ((1,), (None,))}


def test_site_params_are_float32_with_logical_axes():
    x = jnp.zeros((1, 2, I, D), jnp.bfloat16)
    hc = HyperConnection(I, D)
    boxed = jax.eval_shape(lambda: hc.init(jax.random.key(0), x, method="hc_pre"))["params"]
    assert {k: (v.value.shape, v.value.dtype, v.names) for k, v in boxed.items()} == {
        "fn": ((I, D, Z), jnp.float32, (None, "embed", None)),
        "base": ((Z,), jnp.float32, (None,)),
        "scale": ((3,), jnp.float32, (None,)),
    }
    # bf16 streams stay bf16 (mixing in f32, one rounding), as V4's hc_pre / hc_post
    def site(x):
        v = nn.unbox(hc.init(jax.random.key(0), x, method="hc_pre"))
        y, post, comb = hc.apply(v, x, method="hc_pre")
        return y, post, comb, hc.apply(v, y, x, post, comb, method="hc_post")

    y, post, comb, new = jax.eval_shape(site, x)
    assert y.dtype == new.dtype == jnp.bfloat16 and post.dtype == comb.dtype == jnp.float32
    assert new.shape == x.shape and comb.shape == (1, 2, I, I)


# ----------------------------------------------------------------------------------------------
# Parity with transformers (fp32), forward and gradients


def hf_modules():
    torch = pytest.importorskip("torch")
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    cfg = DeepseekV4Config(hidden_size=D, hc_mult=I, hc_sinkhorn_iters=ITERS, hc_eps=HC_EPS,
                           rms_norm_eps=NORM_EPS, num_hidden_layers=1, vocab_size=32)
    return torch, m.DeepseekV4HyperConnection(cfg).float(), m.DeepseekV4HyperHead(cfg).float()


@pytest.mark.parity
def test_hyper_connection_matches_hf_forward_and_grads():
    torch, hf_hc, _ = hf_modules()
    x, f, fn, scale, base = random_site(2, fn_std=0.3)
    with torch.no_grad():
        for p, a in ((hf_hc.fn, fn), (hf_hc.scale, scale), (hf_hc.base, base)):
            p.copy_(torch.from_numpy(a))
    cot = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    xt, ft = torch.from_numpy(x).requires_grad_(), torch.from_numpy(f).requires_grad_()
    post_t, comb_t, y_t = hf_hc(xt)
    new_t = post_t.unsqueeze(-1) * ft.unsqueeze(-2) + torch.matmul(comb_t.transpose(-1, -2), xt)  # DecoderLayer
    ((new_t * torch.from_numpy(cot)).sum() + y_t.square().sum()).backward()

    hc = HyperConnection(I, D, ITERS, HC_EPS, NORM_EPS)

    def loss(params, x, f):
        y, post, comb = hc.apply({"params": params}, x, method="hc_pre")
        new = hc.apply({"params": params}, f, x, post, comb, method="hc_post")
        return jnp.sum(new * cot) + jnp.sum(y**2), (y, post, comb, new)

    params = {"fn": to_ours(fn), "scale": scale, "base": base}
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, f)
    for name, g, w in zip(("y", "post", "comb", "new streams"), outs, (y_t, post_t, comb_t, new_t)):
        w = w.detach().numpy()
        assert_close(g, w, **TOL["layer_f32"], what=f"HyperConnection {name} vs HF")
        print(f"HyperConnection {name} vs HF: max abs err {np.abs(np.asarray(g) - w).max():.2e}")
    want_grads = {"fn": to_ours(hf_hc.fn.grad.numpy()), "scale": hf_hc.scale.grad.numpy(),
                  "base": hf_hc.base.grad.numpy()}
    for k in ("fn", "scale", "base"):  # model_f32: sums over B·T tokens through 20 Sinkhorn rounds
        assert_close(grads[0][k], want_grads[k], **TOL["model_f32"], what=f"d loss / d {k} vs HF")
        print(f"HyperConnection grad {k} vs HF: max abs err {np.abs(grads[0][k] - want_grads[k]).max():.2e} "
              f"(max |grad| {np.abs(want_grads[k]).max():.1e})")
    for name, g, w in (("x", grads[1], xt.grad), ("F", grads[2], ft.grad)):
        assert_close(g, w.numpy(), **TOL["model_f32"], what=f"d loss / d {name} vs HF")


@pytest.mark.parity
def test_hyper_head_matches_hf():
    torch, _, hf_head = hf_modules()
    r = np.random.default_rng(4)
    x = r.standard_normal((B, T, I, D)).astype(np.float32)
    fn, scale, base = (r.standard_normal((I, I * D)) * 0.3).astype(np.float32), np.float32([1.3]), \
        r.standard_normal(I).astype(np.float32)
    with torch.no_grad():
        for p, a in ((hf_head.hc_fn, fn), (hf_head.hc_scale, scale), (hf_head.hc_base, base)):
            p.copy_(torch.from_numpy(a))
        want = hf_head(torch.from_numpy(x)).numpy()
    got = HyperHead(I, D, HC_EPS, NORM_EPS).apply({"params": {"fn": to_ours(fn), "scale": scale, "base": base}}, x)
    assert_close(got, want, **TOL["layer_f32"], what="HyperHead vs HF")
    print(f"HyperHead vs HF: max abs err {np.abs(np.asarray(got) - want).max():.2e}")


# ----------------------------------------------------------------------------------------------
# Invariants


def test_invariants_comb_doubly_stochastic_pre_post_ranges():
    x, f, fn, scale, base = random_site(5, fn_std=0.1)
    _, post, comb, _ = (np.asarray(a, np.float64) for a in apply_site(x, f, fn, scale, base))
    pre = mhc.split_mixes(mhc.mixes(x, to_ours(fn), NORM_EPS), scale, base, I, ITERS, HC_EPS)[0]
    row_err, col_err = np.abs(comb.sum(-1) - 1).max(), np.abs(comb.sum(-2) - 1).max()
    print(f"comb: max |row sum - 1| {row_err:.2e}, max |col sum - 1| {col_err:.2e}")
    assert row_err < 1e-4 and col_err < 1e-4 and comb.min() > 0
    assert np.all((np.asarray(pre) > HC_EPS) & (np.asarray(pre) < 1 + HC_EPS))
    assert np.all((post > 0) & (post < 2))
    # Columns are normalised last, so they sum to 1 - O(eps) for any logits; rows only converge.
    L = np.random.default_rng(6).standard_normal((512, I, I)).astype(np.float32) * 3
    c = np.asarray(mhc.sinkhorn(jnp.asarray(L), ITERS, HC_EPS), np.float64)
    assert np.abs(c.sum(-2) - 1).max() < 1e-5
    assert_close(c, np_sinkhorn(L.astype(np.float64)), **TOL["layer_f32"], what="sinkhorn vs numpy f64")
    print(f"sinkhorn, logits std 3: max |row sum - 1| {np.abs(c.sum(-1) - 1).max():.2e} (20 iterations)")


def test_zero_update_keeps_stream_mean():
    """F = 0: Σ_j X'_j = Σ_i X_i (rows of combᵀ sum to 1), up to the Sinkhorn's convergence and eps."""
    x, f, fn, scale, base = random_site(7)
    new = np.asarray(apply_site(x, 0 * f, fn, scale, base)[3], np.float64)
    assert_close(new.sum(-2), x.astype(np.float64).sum(-2), rtol=1e-4, atol=1e-4, what="stream sum")


# ----------------------------------------------------------------------------------------------
# Degenerate settings (module docstring)


@pytest.mark.parametrize("eps", [HC_EPS, 0.0])
def test_single_stream_is_a_gated_residual(eps):
    """hc_mult = 1: comb = 1 - eps + O(eps²) (exactly 1 at eps = 0), pre = σ(·) + eps, post = 2σ(·):
    X' = post · F + (1 - eps) X, y = pre · X."""
    x, f, fn, scale, base = random_site(8, n=1)
    y, post, comb, new = (np.asarray(a, np.float64) for a in apply_site(x, f, fn, scale, base, n=1, eps=eps))
    exact = (1 + eps) / (1 + 2 * eps)
    for _ in range(2 * (ITERS - 1)):
        exact = exact / (exact + eps)
    assert abs(exact - (1 - eps)) < 1e-11
    np.testing.assert_array_equal(comb, np.float32(exact)) if eps == 0 else \
        np.testing.assert_allclose(comb, 1 - eps, rtol=0, atol=1.2e-7)  # f32 spacing at 1 is 6e-8
    m = np_mixes(x, fn)
    pre = np_sigmoid(m[..., :1] * scale[0] + base[0]) + eps
    assert_close(post, 2 * np_sigmoid(m[..., 1:2] * scale[1] + base[1]), **TOL["layer_f32"], what="post")
    assert_close(y, pre * x[..., 0, :], **TOL["layer_f32"], what="y = pre·x")
    assert_close(new, post[..., None] * f[..., None, :] + (1 - eps) * x, **TOL["layer_f32"], what="X'")


def static_uniform_site(n=I):
    """fn = 0, b_pre = logit(1/I), b_post = 0, b_res = 0."""
    base = np.zeros((2 + n) * n, np.float32)
    base[:n] = -np.log(n - 1)
    return np.zeros(((2 + n) * n, n * D), np.float32), np.ones(3, np.float32), base


def test_static_uniform_maps():
    """fn = 0, pre = 1/I + eps, post = 1, comb = (1 - eps)/I: y = (1 + I eps) mean X and every
    X'_j = F + (1 - eps) mean X."""
    x, f, *_ = random_site(9)
    fn, scale, base = static_uniform_site()
    y, post, comb, new = (np.asarray(a, np.float64) for a in apply_site(x, f, fn, scale, base))
    mean = x.astype(np.float64).mean(-2)
    np.testing.assert_allclose(post, 1.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(comb, (1 - HC_EPS) / I, rtol=0, atol=1e-7)
    assert_close(y, (1 + I * HC_EPS) * mean, **TOL["layer_f32"], what="y")
    assert_close(new, (f + (1 - HC_EPS) * mean)[..., None, :].repeat(I, -2), **TOL["layer_f32"], what="X'")
    head_base = np.full(I, -np.log(I - 1), np.float32)
    head = HyperHead(I, D, HC_EPS, NORM_EPS).apply(
        {"params": {"fn": np.zeros((I, D, I), np.float32), "scale": np.ones(1, np.float32), "base": head_base}}, x)
    assert_close(head, (1 + I * HC_EPS) * mean, **TOL["layer_f32"], what="head")


def test_static_uniform_on_copied_streams_is_the_plain_residual():
    """Two mHC-wrapped sub-layers F(norm(·)) on the embedding copied I times, read by the static head,
    equal the plain pre-norm residual x + F1(norm(x)) then + F2(norm(·)) (to 1e-5)."""
    r = np.random.default_rng(10)
    x = r.standard_normal((B, T, D)).astype(np.float32)
    w1, w2 = (r.standard_normal((D, D)).astype(np.float32) / np.sqrt(D) for _ in range(2))
    norm = lambda h: h / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True) + NORM_EPS)  # noqa: E731
    fn, scale, base = static_uniform_site()
    v = {"params": {"fn": to_ours(fn), "scale": scale, "base": base}}
    head_v = {"params": {"fn": np.zeros((I, D, I), np.float32), "scale": np.ones(1, np.float32),
                         "base": np.full(I, -np.log(I - 1), np.float32)}}
    hc = HyperConnection(I, D, ITERS, HC_EPS, NORM_EPS)

    def mhc_model(x):
        s = mhc.expand_streams(x, I)
        for w in (w1, w2):
            y, post, comb = hc.apply(v, s, method="hc_pre")
            s = hc.apply(v, norm(y) @ w, s, post, comb, method="hc_post")
        return norm(HyperHead(I, D, HC_EPS, NORM_EPS).apply(head_v, s))

    def plain(x):
        for w in (w1, w2):
            x = x + norm(x) @ w
        return norm(x)

    got, want = jax.jit(mhc_model)(x), plain(x)
    assert_close(got, want, **TOL["layer_f32"], what="static mHC vs plain residual")
    print(f"static uniform mHC vs plain residual: max abs err {np.abs(np.asarray(got - want)).max():.2e}")
