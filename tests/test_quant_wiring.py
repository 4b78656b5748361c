"""FP8/FP4 quantisation simulation (`model.quant_sim`) wired into the DeepSeek-V4 layers.

quant_sim="none" traces no quantisation op at all (the quant.py functions are patched to raise),
so the float graph is the one from before the wiring. With "fp8" / "fp8_fp4", V4Attention (a CSA
layer: window kv, compressed entries, indexer) and the MoE layer (blocked experts and the GShard
dispatch) equal a reference assembled here from the layers' pure functions with the quant.py
helpers applied by hand at the official points; the indexer's top-k is compared exactly; the
other expert impls and the V3 weight placement are checked as pure functions. The printed
relative differences from the float output are the simulation's effect (one FP8 linear, input and
weight, is ~4% rms; an FP4 weight ~12%). Gradients are straight-through, so they stay finite.
Last, a tiny V4 model with quant_sim=fp8_fp4 against its float self (same parameters).

Shapes are chosen so blocks matter: D = 160 and Q = 136 make a full and a partial 1×128 block,
the kv's 80 non-RoPE dims a full and a partial 1×64 block, W_oa's checkpoint matrix [W·Y, P·X] =
[160, 192] tiles that span both groups, and W_ob's input blocks run across the groups.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import quant as Q
from deepseek_jax.config import MoEConfig, RopeConfig, V4AttentionConfig, load_model_config
from deepseek_jax.layers.attention.compressor import Compressor
from deepseek_jax.layers.attention.core import visible_entries
from deepseek_jax.layers.attention.indexer import index_scores, select_topk
from deepseek_jax.layers.attention.v4 import V4Attention, sink_attention, window_slots
from deepseek_jax.layers.mlp import swiglu_act
from deepseek_jax.layers.moe.experts import EXPERT_IMPLS
from deepseek_jax.layers.moe.layer import ROUTER_COLLECTION, MoE
from deepseek_jax.layers.moe.router import route
from deepseek_jax.layers.norms import rms_norm, rms_normalize
from deepseek_jax.layers.rope import rope_cos_sin, rope_tail, yarn_inv_freq
from deepseek_jax.models import build_model
from tests.utils import ROOT, TINY_V4_OVERRIDES, TOL, assert_close

B, T, D, EPS = 2, 24, 160, 1e-6
MODES = ("fp8", "fp8_fp4")
CFG = V4AttentionConfig(
    n_heads=4, head_dim=96, rope_head_dim=16, q_lora_rank=136, o_groups=2, o_lora_rank=80,
    window_size=8, index_n_heads=2, index_head_dim=32, index_topk=3,
)  # fmt: skip
ROPE = RopeConfig(rope_theta=160000.0, rope_factor=4.0, original_seq_len=16)
F, E, A, LIMIT = 96, 8, 2, 1.0  # a low clamp, so that random activations cross it
MOE = MoEConfig(n_routed_experts=E, n_activated_experts=A, score_func="sqrtsoftplus", route_scale=1.5,
                moe_inter_dim=F, swiglu_limit=LIMIT, weight_before_down=True, impl="blocked")  # fmt: skip
QUANT_FNS = ("fake_quant_fp8", "fake_quant_fp4", "fake_quant_fp8_weight", "hadamard")


@pytest.fixture(autouse=True)
def _highest_precision(request):
    if "tiny_v4" in request.node.name:  # as test_model_v4.py, whose float forward compile it shares
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield


def random_variables(module, *args):
    """Variables of `module.init(..., *args)`'s shapes, drawn by numpy (an init compile costs more
    than the test): norm scales ~1, mHC's α 0.01 (as init), weights ~N(0, 1/fan_in) (all axes but
    the last, less a stacked expert axis), other vectors and ape ~N(0, 0.25); router bias 0,
    tid2eid A distinct experts a token."""
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "tid2eid":
            return np.argsort(rng.random((*shape[:-1], E)), axis=-1)[..., : shape[-1]].astype(np.int32)
        if name == "bias":
            return np.zeros(shape, np.float32)
        normal = rng.standard_normal(shape).astype(np.float32)
        if name == "scale":
            return (0.01 if np.prod(shape) <= 3 else 1) * (1 + 0.1 * normal)
        if len(shape) < 2 or name == "ape":
            return 0.5 * normal
        stacked = name in ("w_gate", "w_up", "w_down") and len(shape) >= 3  # [..., E, in, out]
        return normal * (shape[-2] if stacked else np.prod(shape[:-1])) ** -0.5

    abstract = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), *args)))
    return jax.tree_util.tree_map_with_path(draw, abstract)


def with_grads(fn, p, x):
    """(fn(p, x) = (out, aux), the gradients w.r.t. p and x of Σ out ⊙ c, c a fixed pattern): the
    forward is shared by the output and the gradients (one compile less)."""

    def loss(p, x):
        out, aux = fn(p, x)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), (out, aux)

    (_, out_aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
    return out_aux, grads


def assert_finite_grads(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), f"non-finite gradient at {jax.tree_util.keystr(path)}"


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# test data from numpy: jax.random inside a jit costs more compile time than the test
X_BTD = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
POS_BT = np.broadcast_to(np.arange(T), (B, T))


# ----------------------------------------------------------------------------------------------
# V4 attention (CSA: every attention quantisation point is live)

RATIO = 4


def attention(mode="none"):
    return V4Attention(CFG, ROPE, RATIO, D, EPS, jnp.float32, mode)


@pytest.fixture(scope="module")
def attn_params():
    return random_variables(attention(), X_BTD, POS_BT)["params"]


def ref_output_proj(o_BTNX, w_oa_WPXY, w_ob_WYD, mode):
    """W_oa quantised as the checkpoint stores it, [W·Y, P·X]; W_ob's input as one [W·Y] vector."""
    W, P, X, Y = w_oa_WPXY.shape
    w_oa_OI = jnp.transpose(w_oa_WPXY, (0, 3, 1, 2)).reshape(W * Y, P * X)
    w_oa_WPXY = jnp.transpose(Q.sim_weight(w_oa_OI, mode).reshape(W, Y, P, X), (0, 2, 3, 1))
    u_BTWY = jnp.einsum("BTWPX,WPXY->BTWY", o_BTNX.reshape(B, T, W, P, X), w_oa_WPXY)
    u_BTK = Q.sim_act(u_BTWY.reshape(B, T, W * Y), mode)
    return u_BTK @ Q.sim_weight(w_ob_WYD, mode, n_in=2).reshape(W * Y, -1)


def ref_compressed(p, x_BTD, c_q_BTQ, rope, mode):
    """CSA: (entries [B, Z, X], each query's top-k slots in [window kv | entries], top-k ids)."""
    cos_BTr, sin_BTr, inv_freq = rope
    compress = lambda q, width: Compressor(RATIO, width, D, EPS, jnp.float32).apply(  # noqa: E731
        {"params": q}, x_BTD, None, 0, inv_freq)[0]
    entries_BZX = Q.sim_kv(compress(p["compressor"], CFG.head_dim), mode, n_rope=CFG.rope_head_dim, block=64)
    visible_BTZ = visible_entries(POS_BT, entries_BZX.shape[1], RATIO)
    ip, P, Y = p["indexer"], CFG.index_n_heads, CFG.index_head_dim
    iq_BTPY = jnp.einsum("BTQ,QPY->BTPY", Q.sim_act(c_q_BTQ, mode), Q.sim_weight(ip["w_uq"], mode))
    iq_BTPY = Q.sim_indexer(rope_tail(iq_BTPY, cos_BTr[:, :, None], sin_BTr[:, :, None]), mode)
    ik_BZY = Q.sim_indexer(compress(ip["compressor"], Y), mode)
    iw_BTP = x_BTD @ ip["w_weights"] * (P * Y) ** -0.5
    idx_BTU, valid_BTU = select_topk(index_scores(iq_BTPY, ik_BZY, iw_BTP, visible_BTZ), visible_BTZ,
                                     CFG.index_topk)
    idx_BTU = jnp.where(valid_BTU, idx_BTU, -1)
    return entries_BZX, jnp.where(valid_BTU, T + idx_BTU, -1), idx_BTU


def ref_attention(p, x_BTD, mode):
    """V4Attention's full forward, rebuilt from the pure functions, quantised by hand."""
    act = lambda u: Q.sim_act(u, mode)  # noqa: E731
    wt = lambda w: Q.sim_weight(w, mode)  # noqa: E731
    R, X = CFG.rope_head_dim, CFG.head_dim
    inv_freq = yarn_inv_freq(R, ROPE.rope_theta, ROPE.rope_factor, ROPE.original_seq_len,
                             ROPE.beta_fast, ROPE.beta_slow)
    cos_BTr, sin_BTr = rope_cos_sin(POS_BT, inv_freq)
    c_q_BTQ = rms_norm(act(x_BTD) @ wt(p["w_dq"]), p["q_norm"]["scale"], EPS)
    q_BTNX = rms_normalize(jnp.einsum("BTQ,QNX->BTNX", act(c_q_BTQ), wt(p["w_uq"])), EPS)
    q_BTNX = rope_tail(q_BTNX, cos_BTr[:, :, None], sin_BTr[:, :, None])
    kv_BTX = rms_norm(act(x_BTD) @ wt(p["w_kv"]), p["kv_norm"]["scale"], EPS)
    kv_BTX = Q.sim_kv(rope_tail(kv_BTX, cos_BTr, sin_BTr), mode, n_rope=R, block=64)
    slots_BTU = jnp.broadcast_to(window_slots(T, CFG.window_size, 0, 0), (B, T, CFG.window_size))
    entries_BZX, cslots_BTU, idx_BTU = ref_compressed(p, x_BTD, c_q_BTQ, (cos_BTr, sin_BTr, inv_freq), mode)
    source_BSX = jnp.concatenate([kv_BTX, entries_BZX], axis=1)
    slots_BTU = jnp.concatenate([slots_BTU, cslots_BTU], axis=-1)
    o_BTNX = sink_attention(q_BTNX, source_BSX, slots_BTU, p["sink"], X**-0.5)
    o_BTNX = rope_tail(o_BTNX, cos_BTr[:, :, None], -sin_BTr[:, :, None])
    return ref_output_proj(o_BTNX, p["w_oa"], p["w_ob"], mode), idx_BTU


@pytest.fixture(scope="module")
def attn_outs(attn_params):
    def fwd(mode, p, x_BTD):
        (out, _), inter = attention(mode).apply({"params": p}, x_BTD, POS_BT, mutable="intermediates")
        return out, inter["intermediates"]["index_topk_BTU"][0]

    @jax.jit
    def run(p, x_BTD):
        """The float output; per mode (module out, module top-k, reference out, reference top-k);
        the fp8_fp4 gradients."""
        outs = {"none": fwd("none", p, x_BTD)[0]}
        for mode in MODES:
            if mode == "fp8_fp4":
                (out, idx), outs["grads"] = with_grads(lambda p, x: fwd(mode, p, x), p, x_BTD)  # noqa: B023
            else:
                out, idx = fwd(mode, p, x_BTD)
            outs[mode] = (out, idx, *ref_attention(p, x_BTD, mode))
        return outs

    return run(attn_params, X_BTD)


def test_none_mode_traces_no_quantisation(attn_params, monkeypatch):
    """quant_sim="none" (the default) builds the float graph: no quant.py function is reached."""

    def boom(*a, **k):
        raise AssertionError("a quantisation function was traced with quant_sim='none'")

    for name in QUANT_FNS:
        monkeypatch.setattr(Q, name, boom)
    assert attention() == V4Attention(CFG, ROPE, RATIO, D, EPS, jnp.float32)  # the default is "none"
    jax.eval_shape(lambda p, x: attention().apply({"params": p}, x, POS_BT), attn_params, X_BTD)
    jax.eval_shape(lambda x: MoE(MOE, D, jnp.float32).init(jax.random.PRNGKey(0), x), X_BTD)
    with pytest.raises(AssertionError, match="traced"):  # the patch is live: a quant mode reaches it
        jax.eval_shape(lambda p, x: attention("fp8").apply({"params": p}, x, POS_BT), attn_params, X_BTD)


@pytest.mark.parametrize("mode", MODES)
def test_attention_matches_hand_quantised_reference(attn_outs, mode):
    out, idx, ref, ref_idx = attn_outs[mode]
    err = float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))
    diff = rel_diff(out, attn_outs["none"])
    print(f"\nV4 attention (CSA) {mode}: max |module - reference| {err:.2e}, rel. diff from float {diff:.3e}")
    assert_close(out, ref, **TOL["layer_f32"], what=f"attention {mode}")
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    assert 1e-3 < diff < 0.3, f"implausible effect of {mode}: {diff}"  # ~4% a linear, 9 casts


def test_attention_gradients_finite(attn_outs):
    """Straight-through: the quantised forward (fp8_fp4) still has finite, non-zero gradients."""
    g_p, g_x = attn_outs["grads"]
    assert_finite_grads((g_p, g_x))
    # (the indexer only picks entries, a discrete choice: no gradient reaches it through the output)
    assert np.abs(g_x).max() > 0 and np.abs(g_p["w_dq"]).max() > 0 and np.abs(g_p["w_oa"]).max() > 0


# ----------------------------------------------------------------------------------------------
# MoE (routed + shared experts)


def ref_routed(x_MD, e_MA, g_MA, w_gate_EDF, w_up_EDF, w_down_EFD, mode, before=True):
    """Σ over a token's pairs of W_down,e(g · h_e(x)) (V4) or g · W_down,e h_e(x) (V3), looped per
    pair, with W_down's input quantised by hand (x and the weights are the caller's)."""
    h_MAF = swiglu_act(jnp.einsum("MD,MADF->MAF", x_MD, w_gate_EDF[e_MA]),
                       jnp.einsum("MD,MADF->MAF", x_MD, w_up_EDF[e_MA]), LIMIT)
    h_MAF = h_MAF * g_MA[..., None] if before else h_MAF
    y_MAD = jnp.einsum("MAF,MAFD->MAD", Q.sim_act(h_MAF, mode), w_down_EFD[e_MA])
    return jnp.sum(y_MAD if before else y_MAD * g_MA[..., None], axis=1)


def ref_moe(p, bias_E, x_BTD, mode):
    """The V4 MoE layer: routing in f32 (not quantised), then everything quantised by hand."""
    act = lambda u: Q.sim_act(u, mode)  # noqa: E731
    x_MD = x_BTD.reshape(-1, D)
    g_MA, e_MA = route(x_MD @ p["w_router"], bias_E, n_activated=A, score_func="sqrtsoftplus",
                       route_scale=MOE.route_scale, norm_topk_prob=True)
    experts = (Q.sim_expert_weight(p[n], mode) for n in ("w_gate", "w_up", "w_down"))
    y_MD = ref_routed(act(x_MD), e_MA, g_MA, *experts, mode)
    s = {k: Q.sim_weight(w, mode) for k, w in p["shared"].items()}
    h_MF = swiglu_act(act(x_MD) @ s["w_gate"], act(x_MD) @ s["w_up"], LIMIT)
    return (y_MD + act(h_MF) @ s["w_down"]).reshape(x_BTD.shape)


MOE_CASES = {"blocked/fp8": "ring", "blocked/fp8_fp4": "ring", "gshard/fp8_fp4": "dense"}  # -> dispatch


@pytest.fixture(scope="module")
def moe_outs():
    x_BTD = X_BTD[:, :16]
    vs = random_variables(MoE(MOE, D, jnp.float32), x_BTD)
    p, bias_E = vs["params"], np.random.default_rng(4).standard_normal(E).astype(np.float32) * 0.1
    vs = {"params": p, ROUTER_COLLECTION: {"bias": bias_E}}

    @jax.jit
    def run(vs, x_BTD):
        """The float output; per case (module out, reference out); the blocked fp8_fp4 gradients."""
        outs = {"none": MoE(MOE, D, jnp.float32).apply(vs, x_BTD)[0]}
        for case, dispatch in MOE_CASES.items():
            mode = case.split("/")[1]
            moe = MoE(dataclasses.replace(MOE, dispatch=dispatch), D, jnp.float32, quant_sim=mode)
            fwd = lambda p, x: moe.apply({**vs, "params": p}, x)  # noqa: E731, B023
            if case == "blocked/fp8_fp4":
                (out, _), outs["grads"] = with_grads(fwd, vs["params"], x_BTD)
            else:
                out = fwd(vs["params"], x_BTD)[0]
            outs[case] = out, ref_moe(p, bias_E, x_BTD, mode)
        return outs

    return run(vs, x_BTD)


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_matches_hand_quantised_reference(moe_outs, case):
    out, ref = moe_outs[case]
    err = float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))
    diff = rel_diff(out, moe_outs["none"])
    print(f"\nMoE {case}: max |module - reference| {err:.2e}, rel. diff from float {diff:.3e}")
    assert_close(out, ref, **TOL["layer_f32"], what=f"MoE {case}")
    assert 1e-3 < diff < 0.3, f"implausible effect of {case}: {diff}"  # FP4 weights: ~12% each


def test_expert_impls_quantise_the_down_input():
    """Every impl: W_down's input is quantised after the routing weight (V4), or without it (V3)."""
    M, mode, rng = 24, "fp8_fp4", np.random.default_rng(5)
    x_MD = rng.standard_normal((M, D)).astype(np.float32)
    e_MA = np.argsort(rng.random((M, E)), axis=-1)[:, :A].astype(np.int32)  # A distinct experts
    g_MA = rng.uniform(0.2, 1.5, (M, A)).astype(np.float32)
    w = [(rng.standard_normal(s) * s[1] ** -0.5).astype(np.float32) for s in [(E, D, F), (E, D, F), (E, F, D)]]

    @jax.jit
    def run(x_MD, e_MA, g_MA, w):
        x_MD, w = Q.sim_act(x_MD, mode), [Q.sim_expert_weight(a, mode) for a in w]
        return {f"{impl}/{before}": (fn(x_MD, e_MA, g_MA, *w, limit=LIMIT, weight_before_down=before,
                                        quant_sim=mode), ref_routed(x_MD, e_MA, g_MA, *w, mode, before))
                for impl, fn in EXPERT_IMPLS.items() for before in (True, False)
                if before or impl == "blocked"}  # V3's placement (weight after W_down) once

    for case, (got, want) in run(x_MD, e_MA, g_MA, w).items():
        assert_close(got, want, **TOL["layer_f32"], what=f"experts {case} {mode}")


def test_moe_gradients_finite(moe_outs):
    """Straight-through: the quantised MoE (blocked, fp8_fp4) has finite, non-zero gradients."""
    g_p, g_x = moe_outs["grads"]
    assert_finite_grads((g_p, g_x))
    assert np.abs(g_p["w_down"]).max() > 0 and np.abs(g_p["shared"]["w_up"]).max() > 0 and np.abs(g_x).max() > 0


# ----------------------------------------------------------------------------------------------
# A tiny V4 model

# test_model_v4.py's tiny V4 (tiny_v4.yaml, narrowed); the float forward is jitted in the same form
# and shapes, so its compile comes from the persistent cache when that file ran first
TINY_V4 = "configs/model/tiny_v4.yaml"


@pytest.mark.slow  # ~15-25 s: two traces and the quantised model's compile
def test_tiny_v4_model_fp8_fp4_runs_close_to_float():
    cfg = load_model_config([ROOT / TINY_V4], TINY_V4_OVERRIDES)
    cfg_q = load_model_config([ROOT / TINY_V4], TINY_V4_OVERRIDES + ["model.quant_sim=fp8_fp4"])
    assert (cfg.quant_sim, cfg_q.quant_sim) == ("none", "fp8_fp4")
    model, model_q = build_model(cfg), build_model(cfg_q)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    variables = random_variables(model, tokens[:, :8])
    out = jax.jit(lambda v, t: model.apply(v, t))(variables, tokens)
    out_q = jax.jit(lambda v, t: model_q.apply(v, t))(variables, tokens)
    assert np.all(np.isfinite(np.asarray(out_q.logits))) and np.all(np.isfinite(np.asarray(out_q.mtp.logits)))
    diff, mtp_diff = rel_diff(out_q.logits, out.logits), rel_diff(out_q.mtp.logits, out.mtp.logits)
    print(f"\ntiny V4 fp8_fp4 vs float: logits rel. diff {diff:.3e}, MTP logits rel. diff {mtp_diff:.3e}")
    # each layer moves by 7-17% (tests above), and in a random model the expert and indexer choices
    # have small margins: by the last layer 20-40% of them flip, so the logits move by ~0.3-0.5
    assert 1e-3 < diff < 0.75 and 1e-3 < mtp_diff < 0.75
