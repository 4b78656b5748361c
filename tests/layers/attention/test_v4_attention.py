"""DeepSeek-V4 attention: sliding-window, CSA and HCA layers vs HF transformers' DeepseekV4Attention
(torch CPU, float32, tiny random config), the indexer's selections exactly, and the decode cache
(step by step, and prefill + chunk + steps) against our own full forward.

T = 37 crosses the window (8) and makes 9 CSA entries (> index_topk = 3) and 4 HCA entries (HF
allows a small HCA ratio through `compress_rates`; 8 here).
"""

import dataclasses

import numpy as np
import pytest

from deepseek_jax.config import ConfigError, RopeConfig, V4AttentionConfig
from tests.utils import TOL, assert_close, assert_close_to_scale

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4  # noqa: E402

from deepseek_jax.layers.attention import V4Attention, init_v4_attention_cache  # noqa: E402

torch.set_num_threads(1)  # bit-stable torch reference
B, T, D = 2, 37, 64
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
RATIOS = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 8,
}
STEPS = {}  # layer type -> jitted cached call, shared by the decode schedules
MIN_MARGIN = 1e-4  # top-k cut gap the selection test requires; fp32 noise in the scores is ~1e-6

HF_CONFIG = {
    "vocab_size": 64, "hidden_size": D, "moe_intermediate_size": 16, "num_hidden_layers": 3,
    "num_attention_heads": 4, "head_dim": 32, "partial_rotary_factor": 0.25, "q_lora_rank": 24,
    "o_groups": 2, "o_lora_rank": 12, "sliding_window": 8, "index_n_heads": 4, "index_head_dim": 16,
    "index_topk": 3, "n_routed_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-6,
    "layer_types": list(LAYER_TYPES), "compress_rates": {k: v for k, v in RATIOS.items() if v},
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "max_position_embeddings": 128,
    "rope_parameters": {  # YaRN on the compressed layers only, no mscale (attention_factor 1)
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0,
    },
}  # fmt: skip
CFG = V4AttentionConfig(
    n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12,
    window_size=8, index_n_heads=4, index_head_dim=16, index_topk=3, compress_rope_theta=160000.0,
)  # fmt: skip
MAIN_ROPE = RopeConfig(rope_theta=10000.0)
COMPRESS_ROPE = RopeConfig(
    rope_theta=160000.0, rope_factor=4.0, original_seq_len=32, beta_fast=32.0, beta_slow=1.0
)


# HF DeepseekV4Attention parameter (suffix after `self_attn.`) -> (our path, transform(w, cfg)).
# HF Linear weights are [out, in]; ours are [in, out] with heads split out.
def _t(w, c):
    return w.T


def _same(w, c):
    return w


HF_V4_ATTENTION_ROWS = {
    "q_a_proj.weight": ("w_dq", _t),
    "q_a_norm.weight": ("q_norm/scale", _same),
    "q_b_proj.weight": ("w_uq", lambda w, c: w.T.reshape(w.shape[1], c.n_heads, c.head_dim)),
    "kv_proj.weight": ("w_kv", _t),
    "kv_norm.weight": ("kv_norm/scale", _same),
    # [W·Y, P·X] viewed [W, Y, P, X] -> [W, P, X, Y]
    "o_a_proj.weight": (
        "w_oa",
        lambda w, c: w.reshape(
            c.o_groups, c.o_lora_rank, c.n_heads // c.o_groups, c.head_dim
        ).transpose(0, 2, 3, 1),
    ),
    "o_b_proj.weight": ("w_ob", lambda w, c: w.T.reshape(c.o_groups, c.o_lora_rank, -1)),
    "sinks": ("sink", _same),
    "compressor.kv_proj.weight": ("compressor/w_kv", _t),
    "compressor.gate_proj.weight": ("compressor/w_gate", _t),
    "compressor.position_bias": ("compressor/ape", _same),
    "compressor.kv_norm.weight": ("compressor/norm/scale", _same),
    "compressor.indexer.q_b_proj.weight": (
        "indexer/w_uq",
        lambda w, c: w.T.reshape(w.shape[1], c.index_n_heads, c.index_head_dim),
    ),
    "compressor.indexer.scorer.weights_proj.weight": ("indexer/w_weights", _t),
    "compressor.indexer.kv_proj.weight": ("indexer/compressor/w_kv", _t),
    "compressor.indexer.gate_proj.weight": ("indexer/compressor/w_gate", _t),
    "compressor.indexer.position_bias": ("indexer/compressor/ape", _same),
    "compressor.indexer.kv_norm.weight": ("indexer/compressor/norm/scale", _same),
}


def params_from_hf(named: dict, cfg: V4AttentionConfig) -> dict:
    """Our parameter tree from HF tensors (numpy); every HF tensor must map."""
    params: dict = {}
    for name, w in named.items():
        path, fn = HF_V4_ATTENTION_ROWS[name]
        *parents, leaf = path.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(fn(w, cfg), dtype=np.float32)
    return params


def build_hf(layer_type: str, seed: int):
    config = transformers.DeepseekV4Config(**HF_CONFIG)
    config._attn_implementation = "eager"
    attn = hf_v4.DeepseekV4Attention(config, LAYER_TYPES.index(layer_type)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in attn.named_parameters():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
            elif t.ndim == 1 or name.endswith("position_bias"):  # sinks, ape: live, not zero
                t.copy_(0.5 * torch.randn(t.shape, generator=gen))
            else:  # Linear [out, in]
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)
    return attn, config


def hf_forward(attn, config, x: np.ndarray):
    """HF output [B, T, D], its indexer's top-k [B, T, k] and raw scores [B, T, Z] (CSA only)."""
    rec = {}
    if attn.compressor is not None and hasattr(attn.compressor, "indexer"):
        idx = attn.compressor.indexer
        idx.register_forward_hook(lambda m, i, o: rec.__setitem__("topk", o.numpy()))
        idx.scorer.register_forward_hook(lambda m, i, o: rec.__setitem__("scores", o.numpy()))
    pos = torch.arange(T)[None].expand(B, T)
    x_t = torch.from_numpy(x)
    rotary = hf_v4.DeepseekV4RotaryEmbedding(config)
    pe = {k: rotary(x_t, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    s, t = np.arange(T)[None, :], np.arange(T)[:, None]
    visible = (s <= t) & (t - s < config.sliding_window)
    mask = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)
    mask = torch.from_numpy(np.broadcast_to(mask, (B, 1, T, T)).copy())
    with torch.no_grad():
        out, _ = attn(x_t, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    return out.numpy(), rec.get("topk"), rec.get("scores")


pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


def our_model(layer_type: str) -> V4Attention:
    ratio = RATIOS[layer_type]
    return V4Attention(CFG, COMPRESS_ROPE if ratio else MAIN_ROPE, ratio, D, 1e-6, jnp.float32)


@pytest.fixture(scope="module", params=LAYER_TYPES)
def layer(request):
    layer_type = request.param
    attn, config = build_hf(layer_type, seed=LAYER_TYPES.index(layer_type))
    named = {k: v.detach().numpy() for k, v in attn.named_parameters()}
    params = params_from_hf(named, CFG)
    x = np.random.default_rng(1).standard_normal((B, T, D)).astype(np.float32)
    model = our_model(layer_type)
    fwd = jax.jit(lambda p, x, pos: model.apply({"params": p}, x, pos, mutable="intermediates"))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    (out, cache), inter = fwd(params, x, positions)
    assert cache is None
    return layer_type, model, params, x, np.asarray(out), inter, hf_forward(attn, config, x)


@pytest.mark.parity
def test_param_tree_matches_init(layer):
    layer_type, model, params, x, *_ = layer
    init = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((B, T), jnp.int32))
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(init["params"]))
    assert shapes == jax.tree.map(lambda a: a.shape, params), layer_type


@pytest.mark.parity
def test_output_matches_hf(layer):
    layer_type, _, _, _, out, _, (hf_out, _, _) = layer
    err = np.abs(out - hf_out).max()
    print(f"\nV4 {layer_type}: max |out - HF| = {err:.2e} (max |HF| {np.abs(hf_out).max():.2f})")
    assert_close(out, hf_out, **TOL["layer_f32"], what=f"{layer_type} output vs HF")


@pytest.mark.parity
def test_indexer_selection_matches_hf(layer):
    layer_type, _, _, _, _, inter, (_, hf_topk, hf_scores) = layer
    if RATIOS[layer_type] != 4:
        pytest.skip("only CSA layers have an indexer")
    m, k = 4, CFG.index_topk
    Z = hf_scores.shape[-1]
    visible = np.arange(Z)[None, None, :] < ((np.arange(T) + 1) // m)[None, :, None]
    s = np.sort(np.where(visible, hf_scores, -np.inf), -1)[..., ::-1]
    rows = np.broadcast_to(visible.sum(-1) > k, (B, T))
    margin = float((s[rows][:, k - 1] - s[rows][:, k]).min())
    assert margin > MIN_MARGIN, f"test input too close to a top-k tie: margin {margin:.2e}"
    ours = np.asarray(inter["intermediates"]["index_topk_BTU"][0])
    n_sel = 0
    for b in range(B):
        for t in range(T):
            want = sorted(int(z) for z in hf_topk[b, t] if z >= 0)
            assert sorted(int(z) for z in ours[b, t] if z >= 0) == want, (b, t)
            n_sel += len(want)
    assert rows.any() and n_sel > 0
    print(f"\nV4 CSA indexer: {n_sel} selections identical to HF, top-k margin {margin:.2e}")


def decode(step, ratio, params, x, chunks):
    """Runs x through a fresh cache in chunks of the given sizes; returns the outputs [B, T, D]."""
    cache = init_v4_attention_cache(CFG, ratio, B, T, jnp.float32)
    outs, start = [], 0
    for n in chunks:
        pos = jnp.broadcast_to(start + jnp.arange(n), (B, n))
        out, cache = step(params, x[:, start : start + n], pos, cache, jnp.int32(start))
        outs.append(np.asarray(out))
        start += n
    return np.concatenate(outs, axis=1)


@pytest.mark.parity
@pytest.mark.parametrize("schedule", ["steps", "prefill_chunk_steps"])
def test_decode_matches_full_forward(layer, schedule):
    layer_type, model, params, x, out, *_ = layer
    # prefill 11 (> window 8, ends mid-block), a chunk of 11 at an unaligned start, then steps
    chunks = [1] * T if schedule == "steps" else [11, 11] + [1] * (T - 22)
    step = STEPS.setdefault(
        layer_type, jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, pos, c, i))
    )
    got = decode(step, model.compress_ratio, params, x, chunks)
    err = np.abs(got - out).max()
    print(f"\nV4 {layer_type} decode ({schedule}): max |decode - forward| = {err:.2e}")
    assert_close(got, out, **TOL["model_f32"], what=f"{layer_type} {schedule} decode vs forward")


QB = 5  # q_block for the blocked runs: 37 queries = 7 blocks of 5 + a ragged last block of 2


def blocked_model(layer_type: str) -> V4Attention:
    ratio = RATIOS[layer_type]
    cfg = dataclasses.replace(CFG, q_block=QB)
    return V4Attention(cfg, COMPRESS_ROPE if ratio else MAIN_ROPE, ratio, D, 1e-6, jnp.float32)


@pytest.mark.parity
def test_q_block_matches_one_block(layer):
    """q_block bounds memory only: the attention and (CSA) the indexer's scoring and top-k run QB
    queries a time, with the one-block output and identical selections."""
    layer_type, _, params, x, out, inter, _ = layer
    model = blocked_model(layer_type)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    (got, _), got_inter = jax.jit(
        lambda p, x: model.apply({"params": p}, x, positions, mutable="intermediates")
    )(params, x)
    err = np.abs(np.asarray(got) - out).max()
    print(f"\nV4 {layer_type}: q_block {QB} vs 0: max |out diff| = {err:.2e}")
    assert_close(got, out, **TOL["resharded_f32"], what=f"{layer_type} q_block {QB} vs 0")
    if RATIOS[layer_type] == 4:
        want = np.asarray(inter["intermediates"]["index_topk_BTU"][0])
        np.testing.assert_array_equal(
            np.asarray(got_inter["intermediates"]["index_topk_BTU"][0]), want
        )
        print(f"V4 CSA q_block {QB}: {int((want >= 0).sum())} top-k selections identical")


@pytest.mark.parity
def test_q_block_grads_and_decode_csa(layer):
    """CSA with q_block: gradients (blocks under remat) equal the one-block ones, and a cached
    prefill + chunk + rest (blocks at an offset start) gives the full forward's output."""
    layer_type, model, params, x, out, *_ = layer
    if RATIOS[layer_type] != 4:
        pytest.skip("CSA only: the indexer is what q_block newly blocks")
    blocked = blocked_model(layer_type)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    r = jax.random.normal(jax.random.key(2), (B, T, D))

    def grads(m):
        loss = lambda p, x: jnp.sum(m.apply({"params": p}, x, positions)[0] * r)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    def check(path, g, w):  # remat recomputes the same f32 math: a layout-level tolerance
        assert_close_to_scale(
            g, w, TOL["resharded_f32"]["rtol"], what=f"grad {jax.tree_util.keystr(path)}"
        )
        return float(jnp.abs(g - w).max())

    errs = jax.tree_util.tree_map_with_path(check, grads(blocked), grads(model))
    print(f"\nV4 CSA q_block {QB}: max |grad diff| = {max(jax.tree.leaves(errs)):.2e}")
    step = jax.jit(lambda p, x, pos, c, i: blocked.apply({"params": p}, x, pos, c, i))
    dec = decode(step, 4, params, x, [11, 11, T - 22])
    err = np.abs(dec - out).max()
    print(f"V4 CSA q_block {QB} decode (11, 11, 15): max |decode - forward| = {err:.2e}")
    assert_close(dec, out, **TOL["model_f32"], what="CSA q_block decode vs forward")


def test_config_errors_name_the_field():
    base = dict(
        n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12,
        window_size=8, index_n_heads=4, index_head_dim=16, index_topk=3,
    )  # fmt: skip
    for bad, field in (
        ({"o_groups": 3}, "o_groups"),
        ({"rope_head_dim": 7}, "rope_head_dim"),
        ({"index_head_dim": 4}, "index_head_dim"),
        ({"window_size": 0}, "window_size"),
        ({"rope_head_dim": 64}, "rope_head_dim"),
    ):
        with pytest.raises(ConfigError, match=field):
            V4AttentionConfig(**{**base, **bad})
