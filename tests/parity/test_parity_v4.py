"""DeepSeek-V4 (as released) at fp32 parity with HF transformers' DeepseekV4ForCausalLM.

A tiny random HF model with every path present: sliding-window, CSA and HCA layers (HCA ratio 8, so
HCA emits entries at T = 40), hash-routed (layers 0-1) and learned sqrt-softplus layers with the
clamped SwiGLU, mHC streams, a sequence longer than the window (8) and more CSA entries (10) than
index_topk (3). Its weights go through convert/v4.py (transformers' in-memory names) into our
decoder; logits, routed experts per layer and the CSA indexer's selections are compared (exactly for
the discrete ones).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from deepseek_jax.convert import table, v4  # noqa: E402
from deepseek_jax.convert.errors import ConversionError  # noqa: E402
from deepseek_jax.convert.importer import abstract_variables  # noqa: E402
from deepseek_jax.convert.source import split_fused  # noqa: E402
from deepseek_jax.models import build_model, layer_kinds, layer_segments  # noqa: E402
from tests.utils import assert_close, fuse_experts  # noqa: E402

pytestmark = pytest.mark.parity
torch.set_num_threads(1)
B, T = 2, 40
HF_CONFIG = {
    "vocab_size": 96, "hidden_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 4,
    "num_attention_heads": 4, "head_dim": 32, "partial_rotary_factor": 0.25, "q_lora_rank": 24,
    "o_groups": 2, "o_lora_rank": 12, "sliding_window": 8, "index_n_heads": 16, "index_head_dim": 16,
    "index_topk": 3, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "rms_norm_eps": 1e-6, "routed_scaling_factor": 1.5, "swiglu_limit": 1.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "num_nextn_predict_layers": 0,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                    "compressed_sparse_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"],
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "max_position_embeddings": 128,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                        "beta_fast": 32.0, "beta_slow": 1.0},
}  # fmt: skip


def _randomise(model, gen):
    """Live values everywhere: norms near 1, biases/sinks/ape/mHC non-trivial, hash tables random."""
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
            elif t.ndim == 1 or name.endswith("position_bias"):
                t.copy_(0.5 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                E, A = HF_CONFIG["n_routed_experts"], HF_CONFIG["num_experts_per_tok"]
                rows = [torch.randperm(E, generator=gen)[:A] for _ in range(buf.shape[0])]
                buf.copy_(torch.stack(rows))
            elif name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def setup():
    config = transformers.DeepseekV4Config(**HF_CONFIG)
    config._attn_implementation = "eager"
    hf = transformers.DeepseekV4ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(0)
    _randomise(hf, gen)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = v4.config_from_json(config.to_dict(), dtype="float32", max_seq_len=128)
    model = build_model(cfg)
    tokens = np.random.default_rng(0).integers(0, HF_CONFIG["vocab_size"], (B, T))
    variables = table.to_variables(split_fused(state), v4.FAMILY, cfg, "hf_memory")
    # every converted array has the shape of the model's variable at its path, both trees complete
    assert _shapes(variables) == _shapes(abstract_variables(cfg))
    return hf, cfg, model, variables, state, tokens


def _hf_run(hf, tokens):
    experts, topk = {}, {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda m, a, out, i=i: experts.__setitem__(i, out[2].numpy())))  # (logits, weights, indices)
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            hooks.append(comp.indexer.register_forward_hook(
                lambda m, a, out, i=i: topk.__setitem__(i, out.numpy())))
    with torch.no_grad():
        logits = hf(torch.from_numpy(tokens)).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, experts, topk


def _our_routing(cfg, inter):
    """Per main-model layer: chosen experts [B*T, A] and (CSA) indexer top-k, from `intermediates`."""
    experts, topk = {}, {}
    for seg in layer_segments(layer_kinds(cfg)):
        for k in range(len(seg.kinds)):
            node = inter[seg.name][f"block_{k}"]
            for r in range(seg.repeats):
                layer = seg.start + r * len(seg.kinds) + k
                experts[layer] = np.asarray(node["ffn"]["experts_MA"][0][r])
                if "index_topk_BTU" in node.get("attn", {}):
                    topk[layer] = np.asarray(node["attn"]["index_topk_BTU"][0][r])
    return experts, topk


def test_v4_model_matches_hf(setup):
    hf, cfg, model, variables, _, tokens = setup
    want, hf_experts, hf_topk = _hf_run(hf, tokens)
    out, inter = jax.jit(lambda v, t: model.apply(v, t, mutable=["intermediates"]))(variables, tokens)
    got = np.asarray(out.logits)
    err = np.abs(got - want).max()
    lp, lq = jax.nn.log_softmax(want.astype(np.float64)), jax.nn.log_softmax(got.astype(np.float64))
    kl = float(np.max(np.sum(np.exp(lp) * (lp - lq), -1)))
    print(f"\nV4 vs HF: max|dlogit| {err:.2e} (max|logit| {np.abs(want).max():.2f}), max KL {kl:.2e}")
    assert err <= 1e-4 and kl <= 1e-6
    assert_close(got, want, rtol=1e-4, atol=1e-4, what="V4 logits")
    ours_experts, ours_topk = _our_routing(cfg, inter["intermediates"])
    for layer, ids in hf_experts.items():
        assert np.array_equal(np.sort(ours_experts[layer], -1), np.sort(ids.reshape(B * T, -1), -1)), layer
    assert set(hf_topk) == set(ours_topk) == {1, 3}
    for layer in hf_topk:
        assert np.array_equal(np.sort(ours_topk[layer], -1), np.sort(hf_topk[layer], -1)), f"indexer layer {layer}"
    print(f"routed experts identical on {len(hf_experts)} layers; indexer top-k identical on layers {sorted(hf_topk)}")


def test_v4_convert_round_trip(setup):
    _, cfg, _, variables, state, _ = setup
    back = fuse_experts(table.from_variables(variables, v4.FAMILY, cfg, "hf_memory"))  # HF's in-memory names
    assert set(back) == set(state)
    for k, v in state.items():
        assert np.array_equal(back[k], v.astype(back[k].dtype)), k
    cfg2 = v4.config_from_json(v4.config_to_json(cfg), dtype="float32", max_seq_len=128)
    assert cfg2 == cfg
    bad = dict(state)
    bad.pop("model.layers.1.self_attn.compressor.indexer.kv_proj.weight")
    with pytest.raises(ConversionError,
                       match=r"missing \['model\.layers\.1\.self_attn\.compressor\.indexer\.kv_proj\.weight'\]"):
        table.to_variables(split_fused(bad), v4.FAMILY, cfg, "hf_memory")
