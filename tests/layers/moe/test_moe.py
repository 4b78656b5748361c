"""DeepSeekMoE: routing vs a numpy reference of HF's DeepseekV3TopkRouter, the balance loss and
bias update vs numpy, ragged vs dense experts, the Linen layer, and the tiny Transformer's MoE
bookkeeping.

Routing decisions are compared exactly, only on tokens whose top-k (and kept-group) margin is
asserted to exceed 1e-3; local letters: P expert groups.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import MoEConfig, load_model_config
from deepseek_jax.layers.moe.balance import sequence_balance_loss, update_router_bias
from deepseek_jax.layers.moe.experts import (
    expert_counts, experts_blocked, experts_dense, experts_ragged,
)
from deepseek_jax.layers.moe.layer import ROUTER_COLLECTION, MoE
from deepseek_jax.layers.moe.router import route
from deepseek_jax.models import build_model
from tests.utils import CONFIGS, TOL, assert_close

MIN_MARGIN = 1e-3
TINY = CONFIGS / "model" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


# ----------------------------------------------------------------------------------------------
# Router


def np_route(
    logits,
    bias,
    *,
    n_activated,
    n_groups=1,
    n_limited_groups=1,
    score_func="sigmoid",
    route_scale=1.0,
    norm_topk_prob=True,
):
    """HF DeepseekV3TopkRouter in float64. Returns weights, experts, and per-token decision margin."""
    logits = logits.astype(np.float64)
    if score_func == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores + bias.astype(np.float64)
    M, E = choice.shape
    margin = np.full(M, np.inf)
    if n_groups > 1:
        group_scores = np.sort(choice.reshape(M, n_groups, E // n_groups), -1)[..., -2:].sum(-1)
        order = np.argsort(-group_scores, -1)
        ranked = np.take_along_axis(group_scores, order, -1)
        margin = ranked[:, n_limited_groups - 1] - ranked[:, n_limited_groups]
        dropped = np.zeros((M, n_groups), bool)
        np.put_along_axis(dropped, order[:, n_limited_groups:], True, -1)
        choice = np.where(np.repeat(dropped, E // n_groups, -1), -np.inf, choice)
    experts = np.argsort(-choice, -1)[:, :n_activated]
    ranked = -np.sort(-choice, -1)
    margin = np.minimum(margin, ranked[:, n_activated - 1] - ranked[:, n_activated])
    weights = np.take_along_axis(scores, experts, -1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * route_scale, experts, margin


def by_expert(weights, experts):
    """Rows sorted by expert id, so selections compare as sets."""
    order = np.argsort(experts, -1)
    return np.take_along_axis(np.asarray(weights), order, -1), np.take_along_axis(
        np.asarray(experts), order, -1
    )


def check_route(logits, bias, kw):
    """route == np_route on the tokens with a safe margin; returns the comparable token mask."""
    w_want, e_want, margin = np_route(logits, bias, **kw)
    w_got, e_got = jax.jit(lambda lo, b: route(lo, b, **kw))(logits, bias)
    assert e_got.dtype == jnp.int32 and w_got.dtype == jnp.float32
    assert e_got.shape == w_got.shape == (logits.shape[0], kw["n_activated"])
    ok = margin > MIN_MARGIN
    assert ok.mean() > 0.5, f"only {ok.sum()} tokens with margin > {MIN_MARGIN}; regenerate inputs"
    w_got, e_got = by_expert(w_got, e_got)
    w_want, e_want = by_expert(w_want, e_want)
    np.testing.assert_array_equal(e_got[ok], e_want[ok])
    assert_close(w_got[ok], w_want[ok], **TOL["layer_f32"], what="routing weights")
    return ok


V3_ROUTING = {"n_activated": 4, "n_groups": 4, "n_limited_groups": 2, "route_scale": 2.5}


def test_route_group_limited_matches_hf_semantics():
    r = np.random.default_rng(0)
    M, E = 256, 16
    logits = (r.standard_normal((M, E)) * 2).astype(np.float32)
    bias = r.uniform(-0.4, 0.4, E).astype(np.float32)  # comparable to score gaps: it changes picks
    ok = check_route(logits, bias, V3_ROUTING)
    # Not vacuous: the bias and the group limit each change some token's selection.
    _, e_biased, _ = np_route(logits, bias, **V3_ROUTING)
    _, e_unbiased, _ = np_route(logits, 0 * bias, **V3_ROUTING)
    _, e_ungrouped, _ = np_route(logits, bias, n_activated=4, route_scale=2.5)
    differs = lambda a, b: (np.sort(a, -1) != np.sort(b, -1)).any(-1)
    assert (differs(e_biased, e_unbiased) & ok).sum() >= 10
    assert (differs(e_biased, e_ungrouped) & ok).sum() >= 10
    # Every pick lies in exactly n_limited_groups groups or fewer.
    w, e = route(logits, bias, **V3_ROUTING)
    assert max(len(set(row // 4)) for row in np.asarray(e)) <= 2
    np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-6)


def test_route_single_group_sigmoid_with_bias():
    r = np.random.default_rng(1)
    logits = r.standard_normal((128, 8)).astype(np.float32)
    bias = r.uniform(-0.3, 0.3, 8).astype(np.float32)
    check_route(
        logits, bias, {"n_activated": 2, "n_groups": 1, "n_limited_groups": 1, "route_scale": 1.5}
    )


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route_softmax(norm_topk_prob):
    r = np.random.default_rng(2)
    logits = (r.standard_normal((128, 8)) * 2).astype(np.float32)
    kw = {
        "n_activated": 3,
        "score_func": "softmax",
        "norm_topk_prob": norm_topk_prob,
        "route_scale": 1.0,
    }
    check_route(logits, np.zeros(8, np.float32), kw)
    w, _ = route(logits, np.zeros(8, np.float32), **kw)
    assert np.all(np.asarray(w).sum(-1) < 1 + 1e-6)  # softmax weights of a subset: at most 1


# ----------------------------------------------------------------------------------------------
# Routing statistics: V3's sequence-wise balance loss, the aux-loss-free bias update


def numpy_balance(scores, experts, mask, A):
    B, T, E = scores.shape
    losses = []
    for b in range(B):
        keep = mask[b].astype(bool)
        if not keep.any():
            continue
        s = scores[b, keep].astype(np.float64)
        chosen = np.zeros_like(s)
        for t, row in enumerate(experts[b, keep]):
            chosen[t, row] = 1.0
        f = E / (A * keep.sum()) * chosen.sum(0)
        p = (s / s.sum(-1, keepdims=True)).mean(0)
        losses.append((f * p).sum())
    return np.mean(losses)


def test_balance_loss_matches_numpy():
    B, T, E, A = 3, 10, 8, 2
    rng = np.random.default_rng(0)
    scores = 1 / (1 + np.exp(-rng.normal(size=(B, T, E)))).astype(np.float32)
    experts = np.argsort(-scores, axis=-1)[..., :A]
    mask = rng.random((B, T)) < 0.7
    mask[2] = False  # an all-padding sequence is left out of the mean
    loss_and_grad = jax.jit(jax.value_and_grad(sequence_balance_loss), static_argnums=3)
    got, grad = loss_and_grad(scores, experts, mask, A)
    np.testing.assert_allclose(float(got), numpy_balance(scores, experts, mask, A), rtol=1e-5)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).sum()) > 0


def test_balance_loss_uniform_is_one_and_collapse_is_e_over_a():
    E, A, T = 8, 2, 4
    experts_uniform = np.arange(T * A).reshape(1, T, A) % E  # every expert chosen exactly once
    ones = np.ones((1, T, E), np.float32)
    mask = np.ones((1, T), bool)
    l_uniform = float(sequence_balance_loss(ones, experts_uniform, mask, A))
    np.testing.assert_allclose(l_uniform, 1.0, rtol=1e-6)
    # half collapsed: tokens share 4 experts, scores spread over them
    half = np.tile(np.array([[0, 1], [2, 3]]), (T // 2, 1))[None]
    scores_half = np.zeros((1, T, E), np.float32)
    scores_half[..., :4] = 1.0
    # all tokens on experts {0, 1}, all score mass there: f = E/A, P = 1/A, L = E/A
    collapsed = np.zeros((1, T, A), np.int32) + np.arange(A)
    scores_col = np.zeros((1, T, E), np.float32)
    scores_col[..., :A] = 1.0
    l_half = float(sequence_balance_loss(scores_half, half, mask, A))
    l_col = float(sequence_balance_loss(scores_col, collapsed, mask, A))
    np.testing.assert_allclose(l_half, E / 4, rtol=1e-6)
    np.testing.assert_allclose(l_col, E / A, rtol=1e-6)
    assert 1.0 < l_half < l_col


def test_router_bias_update():
    counts = jnp.array([10, 0, 5, 5])  # mean 5: expert 0 overloaded, expert 1 underloaded
    new = update_router_bias(jnp.zeros(4), counts, 1e-3)
    np.testing.assert_allclose(new, [-1e-3, 1e-3, 0.0, 0.0])
    bias_LE = jnp.full((2, 4), 0.5, jnp.float32)
    counts_LE = jnp.array([[10, 0, 5, 5], [1, 1, 1, 9]])  # layer means 5 and 3
    new = update_router_bias(bias_LE, counts_LE, 0.01)
    assert new.shape == (2, 4) and new.dtype == jnp.float32
    want = 0.5 + 0.01 * np.array([[-1, 1, 0, 0], [1, 1, 1, -1]])
    np.testing.assert_allclose(new, want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Experts: ragged vs dense vs a loop


def np_experts(x, experts, weights, w_gate, w_up, w_down):
    x, weights, w_gate, w_up, w_down = (
        a.astype(np.float64) for a in (x, weights, w_gate, w_up, w_down)
    )
    y = np.zeros_like(x)
    for m in range(x.shape[0]):
        for a, e in enumerate(experts[m]):
            gate, up = x[m] @ w_gate[e], x[m] @ w_up[e]
            y[m] += weights[m, a] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return y


def expert_inputs(seed=0, M=10, D=8, F=6, E=6, A=2, used=(1, 2, 4)):
    """Random tokens routed only to `used`: experts 0, 3 and 5 (first, middle, last) get none."""
    r = np.random.default_rng(seed)
    experts = np.stack([r.choice(used, A, replace=False) for _ in range(M)]).astype(np.int32)
    weights = r.uniform(0.1, 1.0, (M, A)).astype(np.float32)
    ws = [
        (r.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
        for s in [(E, D, F), (E, D, F), (E, F, D)]
    ]
    return r.standard_normal((M, D)).astype(np.float32), experts, weights, *ws


def test_experts_ragged_dense_and_loop_agree():
    args = expert_inputs()
    want = np_experts(*args)
    ragged = jax.jit(experts_ragged)(*args)
    dense = jax.jit(experts_dense)(*args)
    assert ragged.shape == dense.shape == args[0].shape and ragged.dtype == jnp.float32
    assert_close(ragged, want, **TOL["layer_f32"], what="experts_ragged vs loop")
    assert_close(dense, want, **TOL["layer_f32"], what="experts_dense vs loop")
    assert_close(ragged, dense, **TOL["layer_f32"], what="ragged vs dense")
    for block in (1, 4, 64):  # block 4 pads most runs; 64 exceeds every run
        blocked = jax.jit(lambda *a, b=block: experts_blocked(*a, block=b))(*args)
        assert_close(blocked, want, **TOL["layer_f32"], what=f"experts_blocked(block={block}) vs loop")


def test_experts_gradients_agree():
    args = expert_inputs(seed=3)
    cot = np.random.default_rng(4).standard_normal(args[0].shape).astype(np.float32)

    def loss(impl):
        def f(x, weights, w_gate, w_up, w_down):
            return jnp.sum(impl(x, args[1], weights, w_gate, w_up, w_down) * cot)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))

    inputs = (args[0], *args[2:])
    g_ragged, g_dense = loss(experts_ragged)(*inputs), loss(experts_dense)(*inputs)
    g_blocked = loss(lambda *a: experts_blocked(*a, block=4))(*inputs)
    for name, gr, gd, gb in zip(["x", "weights", "w_gate", "w_up", "w_down"], g_ragged, g_dense, g_blocked):
        assert_close(gr, gd, **TOL["layer_f32"], what=f"d loss / d {name}")
        assert_close(gb, gd, **TOL["layer_f32"], what=f"blocked: d loss / d {name}")
    for g in g_ragged[2:]:  # experts that received no token get no gradient
        assert not np.asarray(g)[[0, 3, 5]].any()
        assert np.abs(np.asarray(g)[[1, 2, 4]]).min(axis=(1, 2)).max() > 0


def test_expert_counts():
    _, experts, *_ = expert_inputs(M=13, A=3, used=(0, 1, 2, 4))
    counts = np.asarray(expert_counts(jnp.asarray(experts), 6))
    assert counts.dtype == np.int32 and counts.sum() == 13 * 3
    np.testing.assert_array_equal(counts, np.bincount(experts.ravel(), minlength=6))


# ----------------------------------------------------------------------------------------------
# The MoE layer

MOE = MoEConfig(
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    route_scale=2.5,
    moe_inter_dim=12,
)
D = 16


@pytest.fixture(scope="module")
def moe_setup():
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 16, D)).astype(np.float32)
    abstract = nn.unbox(jax.eval_shape(MoE(MOE, D, jnp.float32).init, jax.random.key(0), x))
    variables = jax.tree.map(  # fan-in scaled normals (the fan-in axis is the second to last)
        lambda a: (r.standard_normal(a.shape) / np.sqrt(a.shape[-2] if a.ndim > 1 else 1)).astype(
            a.dtype
        ),
        abstract,
    )
    variables[ROUTER_COLLECTION] = {"bias": r.uniform(-0.3, 0.3, 8).astype(np.float32)}
    return abstract, variables, x


def test_router_bias_is_not_a_parameter(moe_setup):
    abstract, _, _ = moe_setup
    assert set(abstract) == {"params", ROUTER_COLLECTION}
    assert abstract[ROUTER_COLLECTION]["bias"].shape == (8,)
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract["params"])
    ]
    assert not any("bias" in p for p in paths), paths
    assert {"w_router", "w_gate", "w_up", "w_down", "shared"} == set(abstract["params"])


def test_ragged_and_dense_layers_agree_and_match_route(moe_setup):
    _, variables, x = moe_setup
    outs = {}
    for impl in ("ragged", "blocked", "dense"):
        layer = MoE(dataclasses.replace(MOE, impl=impl), D, jnp.float32)
        fn = jax.jit(lambda v, x_, layer=layer: layer.apply(v, x_, mutable=["intermediates"]))
        outs[impl] = fn(variables, x)
    (y_r, aux_r), inter = outs["ragged"]
    (y_d, aux_d), _ = outs["dense"]
    (y_b, aux_b), _ = outs["blocked"]
    assert_close(y_b, y_d, **TOL["layer_f32"], what="MoE blocked vs dense")
    np.testing.assert_array_equal(aux_b.counts, aux_d.counts)
    counts_r, counts_d = aux_r.counts, aux_d.counts
    assert y_r.shape == x.shape
    assert_close(y_r, y_d, **TOL["layer_f32"], what="MoE ragged vs dense")
    np.testing.assert_array_equal(counts_r, counts_d)

    (experts_MA,) = inter["intermediates"]["experts_MA"]
    np.testing.assert_array_equal(
        counts_r, np.bincount(np.asarray(experts_MA).ravel(), minlength=8)
    )
    assert int(counts_r.sum()) == 2 * 16 * 2
    logits = x.reshape(-1, D) @ np.asarray(variables["params"]["w_router"])
    kw = {"n_activated": 2, "n_groups": 4, "n_limited_groups": 2, "route_scale": 2.5}
    _, e_route = route(jnp.asarray(logits), jnp.asarray(variables[ROUTER_COLLECTION]["bias"]), **kw)
    _, e_want, margin = np_route(logits, variables[ROUTER_COLLECTION]["bias"], **kw)
    ok = margin > MIN_MARGIN
    assert ok.mean() > 0.5
    for other in (e_route, e_want):
        np.testing.assert_array_equal(
            np.sort(experts_MA, -1)[ok], np.sort(np.asarray(other), -1)[ok]
        )


def test_moe_layer_matches_numpy(moe_setup):
    _, variables, x = moe_setup
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x_MD = x.reshape(-1, D).astype(np.float64)
    kw = {"n_activated": 2, "n_groups": 4, "n_limited_groups": 2, "route_scale": 2.5}
    weights, experts, margin = np_route(
        x_MD @ p["w_router"], variables[ROUTER_COLLECTION]["bias"], **kw
    )
    routed = np_experts(x_MD, experts, weights, p["w_gate"], p["w_up"], p["w_down"])
    gate, up = x_MD @ p["shared"]["w_gate"], x_MD @ p["shared"]["w_up"]
    want = routed + (gate / (1 + np.exp(-gate)) * up) @ p["shared"]["w_down"]
    (y, _) = jax.jit(MoE(MOE, D, jnp.float32).apply)(variables, x)
    ok = margin > MIN_MARGIN
    assert ok.mean() > 0.5
    assert_close(
        np.asarray(y).reshape(-1, D)[ok], want[ok], **TOL["layer_f32"], what="MoE vs numpy"
    )


# ----------------------------------------------------------------------------------------------
# The tiny Transformer (compiling the whole model takes a few seconds on CPU)


def tiny_forward(cfg, B=2, T=8):
    model = build_model(cfg)
    r = np.random.default_rng(6)
    tokens = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
    variables = jax.tree.map(lambda a: (r.standard_normal(a.shape) * 0.1).astype(a.dtype), abstract)
    return jax.jit(model.apply)(variables, tokens)


@pytest.mark.slow
def test_tiny_transformer_outputs_and_expert_counts():
    cfg = load_model_config([TINY])
    B, T, V, E, A = 2, 8, cfg.vocab_size, cfg.moe.n_routed_experts, cfg.moe.n_activated_experts
    out = tiny_forward(cfg, B, T)
    assert out.logits.shape == (B, T, V) and out.logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()
    K = cfg.num_nextn_predict_layers
    assert K >= 1 and out.mtp.logits.shape == (K, B, T, V)
    assert np.isfinite(np.asarray(out.mtp.logits)).all()
    assert out.routing.counts.shape == (cfg.n_moe_layers, E)
    np.testing.assert_array_equal(np.asarray(out.routing.counts).sum(-1), B * T * A)
    assert out.mtp.routing.counts.shape == (K, E)
    np.testing.assert_array_equal(np.asarray(out.mtp.routing.counts).sum(-1), B * T * A)
    assert out.cache is None


@pytest.mark.slow
def test_tiny_transformer_without_mtp():
    cfg = dataclasses.replace(load_model_config([TINY]), num_nextn_predict_layers=0)
    out = tiny_forward(cfg)
    assert out.mtp is None
    assert out.logits.shape == (2, 8, cfg.vocab_size) and np.isfinite(np.asarray(out.logits)).all()
