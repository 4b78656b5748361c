"""Context parallelism on 8 fake CPU devices (layers/attention/context.py, configs/mesh/{cp,fsdp_cp}.yaml).

The machinery on a toy causal attention (dual-chunk-swap order, padding, outputs and gradients of q
args, keys and closed-over weights equal the single-device call; errors name the sizes); then the tiny
V3 (dense MLA), V3.2 (DSA), V4 (SWA / CSA / HCA) and V4.1 models: loss terms, expert counts and
gradients on cp and fsdp_cp equal one device (tests/test_sharding.py's helpers and tolerances), and the
indexers' picks (sown `index_topk_BTU`) equal exactly.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_config
from deepseek_jax.layers.attention.context import ContextError, over_context, swap_order, unswap_order
from deepseek_jax.layers.attention.core import over_query_blocks
from deepseek_jax.sharding import activate, make_mesh, rules
from tests.models.test_v41 import V41_FIVE
from tests.utils import ROOT, TOL, assert_close, assert_close_to_scale

pytestmark = pytest.mark.multidevice
CP_MESHES = ("cp", "fsdp_cp")


def mesh_of(name: str):
    cfg = load_config([ROOT / "configs/model/tiny.yaml", ROOT / f"configs/mesh/{name}.yaml"]).mesh
    return make_mesh(cfg), rules(cfg)


def test_swap_order_matches_numpy():
    """Shard i of cp holds chunks i and 2cp−1−i of 2cp; unswap inverts it."""
    B, T, cp = 2, 24, 3
    x = np.arange(B * T * 2).reshape(B, T, 2)
    got = np.asarray(swap_order(jnp.asarray(x), cp))
    c = T // (2 * cp)
    order = [k for i in range(cp) for k in (i, 2 * cp - 1 - i)]
    want = np.concatenate([x[:, k * c:(k + 1) * c] for k in order], axis=1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(unswap_order(jnp.asarray(got), cp)), x)


def toy_attention(w_DD, q_BTD, pos_BT, k_BSD, kpos_BS):
    """Causal softmax attention whose rule comes from positions (q side) and key positions (keys)."""
    logits_BTS = jnp.einsum("BTD,DE,BSE->BTS", q_BTD, w_DD, k_BSD)
    visible_BTS = kpos_BS[:, None, :] <= pos_BT[:, :, None]
    p_BTS = jax.nn.softmax(jnp.where(visible_BTS, logits_BTS, -1e30), axis=-1)
    return jnp.einsum("BTS,BSD->BTD", p_BTS, k_BSD), pos_BT[..., None] * 1.0


def toy_inputs(B=4, T=32, D=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    w = rng.standard_normal((D, D)) / np.sqrt(D)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return [jnp.asarray(a, jnp.float32) for a in (w, q, k)] + [jnp.asarray(pos)]


def toy_loss(w, q, k, pos, block=0, seen=None):
    def fn(q_BTD, pos_BT, k_BSD, kpos_BS):
        if seen is not None:
            seen.append(q_BTD.shape)
        return toy_attention(w, q_BTD, pos_BT, k_BSD, kpos_BS)  # w closed over (a weight)

    out_BTD, pos_BT1 = over_query_blocks(fn, block, q, pos, keys=(k, pos))
    return jnp.sum(out_BTD * jnp.cos(jnp.arange(out_BTD.size).reshape(out_BTD.shape))), (out_BTD, pos_BT1)


def numpy_toy(w, q, k, pos):
    w, q, k = (np.asarray(a, np.float64) for a in (w, q, k))
    logits = np.einsum("btd,de,bse->bts", q, w, k)
    logits = np.where(np.asarray(pos)[:, None, :] <= np.asarray(pos)[:, :, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), k)


@pytest.mark.parametrize("mesh_name", CP_MESHES)
@pytest.mark.parametrize("T,block", [(32, 0), (32, 2), (20, 3)])  # 20: padded to 24 (cp 4) / 32 (cp 8)
def test_over_context_toy_equals_one_device(mesh_name, T, block):
    """Outputs (in order), gradients of the queries, keys and a closed-over weight equal the direct call
    and a float64 numpy reference; each shard's fn sees T_pad/cp queries."""
    w, q, k, pos = toy_inputs(T=T)
    grad = jax.jit(jax.value_and_grad(lambda *a: toy_loss(*a, block=block), argnums=(0, 1, 2), has_aux=True))
    (want_loss, (want, want_pos)), want_g = grad(w, q, k, pos)
    assert_close(want, numpy_toy(w, q, k, pos), **TOL["layer_f32"], what="direct vs numpy")
    mesh, mesh_rules = mesh_of(mesh_name)
    seen = []
    with activate(mesh, mesh_rules):
        cp = mesh.shape["context"]
        f = jax.jit(jax.value_and_grad(lambda *a: toy_loss(*a, block=block, seen=seen), argnums=(0, 1, 2),
                                       has_aux=True))
        (loss, (got, got_pos)), got_g = f(w, q, k, pos)
    T_pad = -(-T // (2 * cp)) * 2 * cp
    assert seen and all(s[1] == min(block or T_pad // cp, T_pad // cp) for s in seen), (seen, T_pad, cp)
    np.testing.assert_array_equal(np.asarray(got_pos)[..., 0], np.asarray(pos))
    tol = TOL["resharded_f32"]
    assert_close(loss, want_loss, **tol, what="loss")
    assert_close(got, want, **tol, what="outputs")
    for name, g, g_ref in zip(("w", "q", "k"), got_g, want_g):  # sums over tokens, reordered: to scale
        assert_close_to_scale(g, g_ref, tol["rtol"], what=f"grad {name}")


def test_over_context_errors_and_bypass():
    mesh, mesh_rules = mesh_of("cp")
    w, q, k, pos = toy_inputs()
    fn = lambda qa, ka: toy_attention(w, *qa, *ka)  # noqa: E731
    with activate(mesh, mesh_rules):
        with pytest.raises(ContextError, match=r"every q arg must be \[B=4, T=32"):
            over_context(fn, (q, pos[:, :16]), (k, pos))
    with activate(mesh, mesh_rules, context_strategy="ring"):
        with pytest.raises(ContextError, match="context_strategy='ring' is not implemented"):
            over_context(fn, (q, pos), (k, pos))
    single, single_rules = mesh_of("single")
    calls = []
    with activate(single, single_rules):  # no context split: fn called directly on whole arrays
        over_context(lambda qa, ka: calls.append(qa[0].shape), (q, pos), (k, pos))
    assert calls == [q.shape]
    with nn.logical_axis_rules(()):
        assert over_context(lambda qa, ka: qa[0].shape, (q,), ()) == q.shape


# ---- the plan: context-parallel collective volume --------------------------------------------------------------

def test_context_volume_matches_long_context_numbers():
    """V4-Flash at T = 2^20, one sequence per device, cp = 8: per CSA layer the compressed entries and
    indexer keys are 256 + 64 MiB, per HCA layer 8 MiB (long_context.md §6, bf16), on top of the window
    kv T × 512 × 2 B; the strategies' bytes follow the module formulas."""
    from deepseek_jax.plan.context import context_volume

    m = load_config([ROOT / "configs/model/deepseek_v4_flash.yaml"]).model
    T, cp, MiB = 2**20, 8, 2**20
    layers = context_volume(m, 1, T, cp)
    assert len(layers) == len(m.compress_ratios)
    window = T * m.v4.head_dim * 2
    for x, r in zip(layers, m.compress_ratios):
        want = window + {0: 0, 4: 320 * MiB, 128: 8 * MiB}[r]
        assert x.key_bytes == want and x.kind.startswith({0: "SWA", 4: "CSA", 128: "HCA"}[r]), (x, r)
        K, remat = x.key_bytes, m.remat != "none"
        assert x.all_gather == K * (1 + remat) + K // cp and x.ring == (3 + remat) * (cp - 1) * K // cp
        assert x.halo == 2 * (m.v4.window_size - 1) * m.v4.head_dim * 2
    assert context_volume(m, 1, T, 1) == []


def test_context_volume_of_dsa_stages():
    """V3.2: the sparse stage gathers latent + rope + indexer keys, C + R + Y per token; the dense
    warm-up runs naive attention, so per-head keys N(H + O) + R + Y (+ 4 bytes of int32 document id)."""
    from deepseek_jax.plan.context import context_volume

    m = load_config([ROOT / "configs/model/tiny_v32.yaml"]).model
    a, Y, c, B, T = m.mla, m.index.index_head_dim, 2 if m.dtype == "bfloat16" else 4, 2, 64
    sparse_row = (a.kv_lora_rank + a.qk_rope_head_dim + Y) * c + 4
    dense_row = (a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) + a.qk_rope_head_dim + Y) * c + 4
    for dense, row in ((False, sparse_row), (True, dense_row)):
        cfg = dataclasses.replace(m, index=dataclasses.replace(m.index, index_dense_warmup=dense))
        layers = context_volume(cfg, B, T, 4)
        assert [x.key_bytes for x in layers] == [B * T * row] * len(layers) and layers[0].kind == "DSA", dense


@pytest.mark.slow  # plans a whole model on an abstract mesh (~4 s)
def test_plan_reports_context_volume_on_abstract_mesh():
    """`plan` lowered on an abstract cp mesh (no devices): the tiny V3's dense MLA layers each
    all-gather B_l · T · (N(H + O) + R) · c + 4 (int32 document id) bytes of per-head keys (the naive
    training path, not the latent C + R), the estimate holds them, and the report prints the table. On
    `cp` (weights replicated: no weight all-gathers) the estimate's all-gathers are exactly the keys'."""
    from deepseek_jax.plan import format_report, plan
    from deepseek_jax.plan.analytic import estimate
    from deepseek_jax.program import build_program
    from deepseek_jax.sharding import abstract_mesh

    small = ["model.n_layers=2", "model.n_dense_layers=1", "model.num_nextn_predict_layers=0",
             "model.vocab_size=512", "data.global_batch_size=8", "data.seq_len=64"]
    cfg = load_config([ROOT / "configs/train/tiny_stdlib.yaml", ROOT / "configs/mesh/fsdp_cp.yaml"], small)
    r = plan(cfg, 16, compile=False)  # fsdp 4 x context 4
    m, c = cfg.model, 2 if cfg.model.dtype == "bfloat16" else 4
    a = m.mla
    row = (a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) + a.qk_rope_head_dim) * c + 4
    assert [x.key_bytes for x in r.context] == [(8 // 4) * 64 * row] * 2 and {x.kind for x in r.context} == {"MLA"}
    assert r.estimate["collective-permute"].bytes == sum(x.permute for x in r.context) > 0
    assert r.estimate["all-gather"].bytes >= sum(x.key_bytes for x in r.context)
    cp = load_config([ROOT / "configs/train/tiny_stdlib.yaml", ROOT / "configs/mesh/cp.yaml"], small)
    est = estimate(build_program(cp, abstract_mesh(cp.mesh, 8), rules(cp.mesh)))  # B_l = 8, T = 64
    remat = int(m.remat != "none")
    assert est["all-gather"] == (2 * (1 + remat), 2 * (1 + remat) * 8 * 64 * row), est["all-gather"]
    text = format_report(r)
    assert "context parallelism over 4 devices at seq_len 64" in text and "all_gather" in text


# ---- the tiny models: cp / fsdp_cp equal one device ----------------------------------------------------------

MODELS = ("tiny", "tiny_v32", "tiny_v4", "tiny_v41")
# test_sharding's tiny V4.1 cut from 9 layers to 5 that keep every layer role (the 8-device compile is the cost)
CP_OVERRIDES = {"tiny_v41": V41_FIVE}
_REFERENCES = {}


def small_cfg(mesh_name: str, model: str):
    """test_sharding's small config of the tiny model on a mesh file (with CP_OVERRIDES)."""
    from tests import test_sharding as ts

    return ts.small_cfg(mesh_name, *CP_OVERRIDES.get(model, ()), model=model)


def reference(model: str):
    """test_sharding's single-device loss terms, counts and gradients of the tiny model (cached)."""
    from tests import test_sharding as ts

    if model not in _REFERENCES:
        _REFERENCES[model] = ts.single_device(small_cfg("single", model))
    return _REFERENCES[model]


def sown_picks(cfg, v, batch, mesh_name: str | None = None) -> list[np.ndarray]:
    """Every attention layer's sown indexer picks (`index_topk_BTU`) of the forward, in tree order."""
    from deepseek_jax.models import build_model

    model, m = build_model(cfg.model), cfg.model

    def f(params, router, batch):
        _, inter = model.apply(
            {"params": params, "router": router}, batch["tokens"], None if m.row_positions else batch["positions"],
            batch["segment_ids"], return_logits=False, engram_rows=batch.get("engram_rows"), mutable=["intermediates"])
        return [x for p, x in jax.tree_util.tree_leaves_with_path(inter) if "index_topk_BTU" in jax.tree_util.keystr(p)]

    args = (v["params"], v["router"], batch)
    if mesh_name is None:
        return jax.device_get(jax.jit(f)(*args))
    mesh, mesh_rules = mesh_of(mesh_name)
    with activate(mesh, mesh_rules):
        return jax.device_get(jax.jit(f)(*args))


@pytest.mark.slow  # a grad compile on 8 devices per case (~5-30 s), the single-device reference once per model
@pytest.mark.parametrize("mesh_name", CP_MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_tiny_models_on_context_parallel_meshes(model, mesh_name):
    """Loss terms, expert counts and gradients on cp / fsdp_cp equal one device (state tolerances:
    rtol 1e-5, gradients to scale); the DSA / CSA / V4.1 indexer picks equal exactly."""
    from tests import test_sharding as ts

    v, batch, ref_out, ref_grads = reference(model)
    cfg = small_cfg(mesh_name, model)
    _, out, grads, _ = ts.run_on_mesh(cfg, v, batch)
    # V4.1's Engram gate: see test_sharding.test_layout_invariance_v41 (slope 1/(2√|d|) near d = 0). The
    # mHC mixing scales (`attn_hc`, `ffn_hc`, `hc_head`: one to three scalars each) are sums over all B·T
    # tokens that the sequence split regroups: measured 2.5e-5 (V4 MTP hc_head) and 4.5e-5 (9-layer V4.1
    # layer 6 attn_hc) of themselves, so 1e-4 there; every other gradient and the loss terms at rtol 1e-5
    rtols = {"/engram/": 1e-2, "_hc/scale": 1e-4, "hc_head/scale": 1e-4}
    ts.compare(out, grads, ref_out, ref_grads, f"{model}/{mesh_name}", rtols=rtols)
    if model != "tiny":
        want, got = sown_picks(cfg, v, batch), sown_picks(cfg, v, batch, mesh_name)
        assert want and len(got) == len(want), (len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_array_equal(g, w, err_msg=f"{model}/{mesh_name}: indexer picks of layer entry {i}")


@pytest.mark.slow  # one 8-device grad compile (~20 s)
def test_query_blocks_inside_context_parallelism():
    """Query blocks smaller than a device's T/cp queries: the blocked scan runs inside the context
    shard_map (core._blocks), where the weights fn closes over used to arrive typed on the outer mesh and
    the scan's transpose failed to trace. Tiny V3.2 (DSA) on fsdp_cp with mla.q_block 2 equals one device."""
    from tests import test_sharding as ts

    v, batch, ref_out, ref_grads = reference("tiny_v32")
    cfg = small_cfg("fsdp_cp", "tiny_v32")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mla=dataclasses.replace(cfg.model.mla,
                                                                                              q_block=2)))
    assert batch["tokens"].shape[1] // 4 > 2  # T/cp queries a device, more than one block of them
    _, out, grads, _ = ts.run_on_mesh(cfg, v, batch)
    ts.compare(out, grads, ref_out, ref_grads, "tiny_v32/fsdp_cp/q_block=2")
