"""DeepSeek-V4 MoE: sqrt-softplus routing with the selection bias, hash routing through `tid2eid`, the
clamped SwiGLU on routed and shared experts, the routing weight before the down projection; fp32
parity with transformers' DeepseekV4SparseMoeBlock (learned and hash layers), numpy references, and
the expert-parallel dispatch strategies on 8 fake devices.

Learned routing decisions are compared exactly on tokens whose top-k margin exceeds 1e-3."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, MoEConfig, load_config
from deepseek_jax.layers.mlp import MLP, swiglu_act
from deepseek_jax.layers.moe import dispatch as dsp
from deepseek_jax.layers.moe.experts import EXPERT_IMPLS
from deepseek_jax.layers.moe.layer import ROUTER_COLLECTION, MoE
from deepseek_jax.layers.moe.router import hash_route, random_hash_table, route
from deepseek_jax.sharding import activate, make_mesh, rules
from tests.utils import ROOT, TOL, assert_close

B, T, D, F, E, A, V = 2, 16, 16, 12, 8, 2, 50
LIMIT, SCALE, MIN_MARGIN = 1.0, 1.5, 1e-3  # a low clamp so that random activations cross it
V4 = MoEConfig(n_routed_experts=E, n_shared_experts=1, n_activated_experts=A, score_func="sqrtsoftplus",
               route_scale=SCALE, moe_inter_dim=F, swiglu_limit=LIMIT, weight_before_down=True, n_hash_layers=1)


pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


def np_silu(z):
    return z / (1 + np.exp(-z))


def np_clamped_swiglu(gate, up, limit):
    return np_silu(np.minimum(gate, limit)) * np.clip(up, -limit, limit)


def np_scores(logits):
    return np.sqrt(np.log1p(np.exp(logits.astype(np.float64))))


# ----------------------------------------------------------------------------------------------
# Clamped SwiGLU and the experts


def test_swiglu_clamp_matches_numpy():
    """Gate clamped from above only, the linear half both ways; limit 0 = no clamp (V3)."""
    g, u = np.meshgrid(np.linspace(-4, 4, 33), np.linspace(-4, 4, 33))
    got = np.asarray(swiglu_act(jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32), 1.5))
    assert_close(got, np_clamped_swiglu(g, u, 1.5), **TOL["layer_f32"], what="clamped swiglu")
    assert_close(swiglu_act(g, u, 0.0), np_silu(g) * u, **TOL["layer_f32"], what="unclamped swiglu")
    assert got[0, 0] != 0 and np.all(got[:, -1] == got[:, -2])  # gate -4 still passes; gate >= 1.5 is flat
    r = np.random.default_rng(0)
    x, wg, wu, wd = (r.standard_normal(s).astype(np.float32) for s in ((3, 4, D), (D, F), (D, F), (F, D)))
    y = MLP(D, F, jnp.float32, LIMIT).apply({"params": {"w_gate": wg, "w_up": wu, "w_down": wd}}, x)
    assert_close(y, np_clamped_swiglu(x @ wg, x @ wu, LIMIT) @ wd, **TOL["layer_f32"], what="clamped MLP")


def np_experts(x, experts, weights, wg, wu, wd, limit):
    y = np.zeros(x.shape, np.float64)
    for m in range(x.shape[0]):
        for a, e in enumerate(experts[m]):
            y[m] += weights[m, a] * (np_clamped_swiglu(x[m] @ wg[e], x[m] @ wu[e], limit) @ wd[e])
    return y


@pytest.mark.parametrize("before", [True, False], ids=["weight_before_down", "weight_after_down"])
def test_expert_impls_clamp_and_weight_placement(before):
    r = np.random.default_rng(1)
    M = 24
    x = r.standard_normal((M, D))
    experts = np.stack([r.choice(E, A, replace=False) for _ in range(M)]).astype(np.int32)
    experts[:3, 0] = -1  # foreign pairs (another shard's experts) contribute nothing
    weights = r.uniform(0.1, 1.0, (M, A))
    ws = [r.standard_normal(s) / np.sqrt(s[1]) for s in ((E, D, F), (E, D, F), (E, F, D))]
    want = np_experts(x, np.where(experts < 0, 0, experts), np.where(experts < 0, 0, weights), *ws, LIMIT)
    args = [a.astype(np.float32) for a in (x, experts, weights, *ws)]
    args[1] = experts
    for impl, fn in EXPERT_IMPLS.items():
        got = jax.jit(lambda *a, fn=fn: fn(*a, limit=LIMIT, weight_before_down=before))(*args)
        assert_close(got, want, **TOL["layer_f32"], what=f"experts_{impl} (before={before}) vs numpy")


# ----------------------------------------------------------------------------------------------
# Routing


def test_sqrtsoftplus_route_and_hash_route_match_numpy():
    r = np.random.default_rng(2)
    M = 128
    logits = (r.standard_normal((M, E)) * 2).astype(np.float32)
    bias = r.uniform(-0.3, 0.3, E).astype(np.float32)
    s = np_scores(logits)
    choice = s + bias
    ranked = -np.sort(-choice, -1)
    ok = ranked[:, A - 1] - ranked[:, A] > MIN_MARGIN
    assert ok.mean() > 0.9
    want_e = np.sort(np.argsort(-choice, -1)[:, :A], -1)
    w, e = route(logits, bias, n_activated=A, score_func="sqrtsoftplus", route_scale=SCALE)
    order = np.argsort(np.asarray(e), -1)
    e, w = np.take_along_axis(np.asarray(e), order, -1), np.take_along_axis(np.asarray(w), order, -1)
    np.testing.assert_array_equal(e[ok], want_e[ok])
    g = np.take_along_axis(s, want_e, -1)  # unbiased scores, renormalised, scaled
    assert_close(w[ok], (g / g.sum(-1, keepdims=True) * SCALE)[ok], **TOL["layer_f32"], what="V4 weights")
    assert (np.sort(np.argsort(-s, -1)[:, :A], -1) != want_e)[ok].any()  # the bias changes some choices

    table = np.asarray(random_hash_table(jax.random.key(0), V, E, A))
    assert table.dtype == np.int32 and table.shape == (V, A) and table.min() >= 0 and table.max() < E
    assert all(len(set(row)) == A for row in table)  # A distinct experts per token id
    tokens = r.integers(0, V, M)
    w, e = hash_route(logits, tokens, table, route_scale=SCALE)
    np.testing.assert_array_equal(e, table[tokens])
    g = np.take_along_axis(s, table[tokens], -1)
    assert_close(w, g / g.sum(-1, keepdims=True) * SCALE, **TOL["layer_f32"], what="hash weights")


def test_hash_layer_variables_and_errors():
    x = jnp.zeros((1, 4, D))
    tokens = jnp.arange(4)[None]
    hashed = MoE(V4, D, jnp.float32, hash_routing=True, vocab_size=V)
    v = jax.eval_shape(lambda: hashed.init(jax.random.key(0), x, None, tokens))
    assert set(v[ROUTER_COLLECTION]) == {"tid2eid"} and "bias" not in v[ROUTER_COLLECTION]
    tid2eid = v[ROUTER_COLLECTION]["tid2eid"]
    assert tid2eid.value.shape == (V, A) and tid2eid.value.dtype == jnp.int32 and tid2eid.names == (None, None)
    assert {"w_router", "w_gate", "w_up", "w_down", "shared"} == set(v["params"])
    learned = jax.eval_shape(lambda: MoE(V4, D, jnp.float32).init(jax.random.key(0), x))
    assert set(learned[ROUTER_COLLECTION]) == {"bias"}
    with pytest.raises(ConfigError, match="token ids"):
        hashed.init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match="swiglu_limit"):
        dataclasses.replace(V4, swiglu_limit=-1.0)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV4SparseMoeBlock (fp32)


@pytest.fixture(scope="module")
def hf_setup():
    torch = pytest.importorskip("torch")
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = DeepseekV4Config(
        hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=A, n_shared_experts=1,
        routed_scaling_factor=SCALE, swiglu_limit=LIMIT, vocab_size=V, num_hidden_layers=2,
        mlp_layer_types=["hash_moe", "moe"], scoring_func="sqrtsoftplus", norm_topk_prob=True,
    )
    cfg._experts_implementation = "eager"  # the per-expert loop (set by from_pretrained; standalone here)
    r = np.random.default_rng(3)
    blocks = {}
    for kind, idx in (("hash", 0), ("learned", 1)):
        blk = DeepseekV4SparseMoeBlock(cfg, idx).float()
        with torch.no_grad():
            for name, p in blk.named_parameters():
                p.copy_(torch.from_numpy(r.standard_normal(tuple(p.shape)) / np.sqrt(p.shape[-1])))
            if kind == "hash":
                blk.gate.tid2eid.copy_(torch.from_numpy(np.array(random_hash_table(jax.random.key(1), V, E, A))))
            else:
                blk.gate.e_score_correction_bias.copy_(torch.from_numpy(r.uniform(-0.1, 0.1, E)))
        blocks[kind] = blk
    x = r.standard_normal((B, T, D)).astype(np.float32)
    tokens = r.integers(0, V, (B, T))
    return torch, blocks, x, tokens


def ours_from_hf(blk, hash_routing):
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in blk.state_dict().items()}
    gu, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]  # [E, 2F, D] (gate | up), [E, D, F]
    params = {
        "w_router": sd["gate.weight"].T,
        "w_gate": gu[:, :F].transpose(0, 2, 1), "w_up": gu[:, F:].transpose(0, 2, 1), "w_down": down.transpose(0, 2, 1),
        "shared": {k: sd[f"shared_experts.{k[2:]}_proj.weight"].T for k in ("w_gate", "w_up", "w_down")},
    }
    router = {"tid2eid": blk.gate.tid2eid.numpy().astype(np.int32)} if hash_routing else \
        {"bias": sd["gate.e_score_correction_bias"]}
    return {"params": params, ROUTER_COLLECTION: router}


def hf_reference(torch, blk, x, tokens, hash_routing):
    with torch.no_grad():
        xt, ids = torch.from_numpy(x), torch.from_numpy(tokens)
        _, w, e = blk.gate(xt, ids) if hash_routing else blk.gate(xt)
        y = blk(xt, input_ids=ids).numpy()
        gate_up = torch.einsum("md,efd->mef", xt.reshape(-1, D), blk.experts.gate_up_proj)
    clamped = (gate_up[..., F:].abs() > LIMIT).float().mean().item()  # share of clamped `up` values
    return y, w.numpy(), e.numpy(), clamped


# the impls' equivalence (with either weight placement) is tested against numpy above; these cover
# both routings, both weight placements and two impls against HF
CASES = [("learned", "ragged", True), ("hash", "ragged", True), ("learned", "dense", False)]


@pytest.mark.parity
@pytest.mark.parametrize("kind,impl,before", CASES, ids=[f"{k}-{i}-{'before' if b else 'after'}" for k, i, b in CASES])
def test_v4_moe_matches_hf(hf_setup, kind, impl, before):
    torch, blocks, x, tokens = hf_setup
    hashed = kind == "hash"
    y_want, w_want, e_want, clamped = hf_reference(torch, blocks[kind], x, tokens, hashed)
    assert clamped > 0.05, "the clamp must be exercised"
    cfg = dataclasses.replace(V4, impl=impl, weight_before_down=before)
    layer = MoE(cfg, D, jnp.float32, hash_routing=hashed, vocab_size=V if hashed else 0)
    fn = jax.jit(lambda v, x, t: layer.apply(v, x, None, t, mutable=["intermediates"]))
    (y, aux), inter = fn(ours_from_hf(blocks[kind], hashed), x, tokens)
    (e_got,) = inter["intermediates"]["experts_MA"]
    ok = np.ones(B * T, bool)
    if not hashed:  # decisions compared where the biased top-k margin is safe
        v = ours_from_hf(blocks[kind], False)
        choice = np_scores(x.reshape(-1, D) @ v["params"]["w_router"]) + v[ROUTER_COLLECTION]["bias"]
        ranked = -np.sort(-choice, -1)
        ok = ranked[:, A - 1] - ranked[:, A] > MIN_MARGIN
        assert ok.mean() > 0.9
    np.testing.assert_array_equal(np.sort(np.asarray(e_got), -1)[ok], np.sort(e_want, -1)[ok])
    y, y_want = np.asarray(y).reshape(-1, D)[ok], y_want.reshape(-1, D)[ok]
    assert_close(y, y_want, **TOL["layer_f32"], what=f"V4 MoE ({kind}, {impl}, before={before}) vs HF")
    print(f"V4 MoE {kind}/{impl}/{'before' if before else 'after'} vs HF: max abs err "
          f"{np.abs(y - y_want).max():.2e}, routed experts identical on {ok.sum()}/{ok.size} tokens")
    np.testing.assert_array_equal(aux.counts, np.bincount(np.asarray(e_got).ravel(), minlength=E))
    assert (float(aux.balance_loss) == 0.0) == hashed


# ----------------------------------------------------------------------------------------------
# Dispatch strategies on 8 fake devices: a2a, ragged_a2a (emulated) and dense carry the routing
# weight to the expert shard when it is applied before the down projection


@pytest.mark.multidevice
def test_v4_dispatch_strategies_match_numpy():
    r = np.random.default_rng(4)
    Bm, Tm = 8, 4  # the batch splits over the 8 devices of fsdp_ep (act_batch over fsdp x expert)
    x = r.standard_normal((Bm, Tm, D)).astype(np.float32)
    experts = np.stack([r.choice(E, A, replace=False) for _ in range(Bm * Tm)]).reshape(Bm, Tm, A).astype(np.int32)
    weights = r.uniform(0.1, 1.0, (Bm, Tm, A)).astype(np.float32)
    ws = [(r.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    want = np_experts(x.reshape(-1, D).astype(np.float64), experts.reshape(-1, A), weights.reshape(-1, A),
                      *(w.astype(np.float64) for w in ws), LIMIT).reshape(x.shape)
    mcfg = load_config([ROOT / "configs/model/tiny.yaml", ROOT / "configs/mesh/fsdp_ep.yaml"]).mesh
    mesh, mesh_rules = make_mesh(mcfg), rules(mcfg)
    for dispatch in ("a2a", "dense", "ragged_a2a_emulated"):  # ring runs the expert impls as tested above
        c = dataclasses.replace(V4, dispatch=dispatch)
        with activate(mesh, mesh_rules):
            y, dropped = jax.jit(partial(dsp.dispatch_experts, c))(x, experts, weights, np.ones((Bm, Tm), bool), *ws)
        assert int(dropped) == 0
        assert_close(y, want, **TOL["layer_f32"], what=f"fsdp_ep/{dispatch} (clamp, weight before down) vs numpy")

