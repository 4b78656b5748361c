"""A tiny random HF transformers DeepseekV32Attention (MLA + DSA indexer; torch, CPU, float32) and
the mapping of its tensors onto our MLA (with the DSA indexer) parameters (the rows convert/v3.py needs for V3.2).

Initialised with fan-in scaling as in hf_reference.py; norm weights are 1 + N(0, 0.1) and the
indexer's LayerNorm bias N(0, 0.1), so a converter that drops either fails.
"""

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32

from deepseek_jax.config import IndexerConfig
from deepseek_jax.convert.v3 import config_from_json

torch.set_num_threads(1)  # bit-stable torch reference


def tiny_v32_config(**kw) -> dict:
    cfg = {
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": 1, "first_k_dense_replace": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "n_group": 1,
        "topk_group": 1, "num_experts_per_tok": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "routed_scaling_factor": 1.0, "n_shared_experts": 1, "norm_topk_prob": True,
        "index_n_heads": 8, "index_head_dim": 16, "index_topk": 8,  # T = 24 > top-k: sparsity live
        "rope_parameters": {  # YaRN live, mscale != mscale_all_dim: cos/sin carry a scale
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 0.8,
        },
    }  # fmt: skip
    cfg.update(kw)
    return cfg


def our_configs(hf_cfg: dict):
    """(MLAConfig, RopeConfig, IndexerConfig) for an HF DeepseekV32 config dict."""
    model = config_from_json(hf_cfg, dtype="float32")
    index = IndexerConfig(
        index_n_heads=hf_cfg["index_n_heads"],
        index_head_dim=hf_cfg["index_head_dim"],
        index_topk=hf_cfg["index_topk"],
    )
    return model.mla, model.rope, index


def build_hf_attention(hf_cfg: dict, seed: int = 0):
    """(DeepseekV32Attention, its config), randomly initialised, float32, eval mode, eager."""
    config = transformers.DeepseekV32Config(**hf_cfg)
    config._attn_implementation = "eager"
    attn = hf_v32.DeepseekV32Attention(config, layer_idx=0).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in attn.named_parameters():
            if name.endswith("k_norm.bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            elif t.ndim == 1:  # norm weights
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
            else:  # Linear [out, in]
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)
    return attn, config


def hf_mask(B: int, T: int, segment_ids: np.ndarray | None = None) -> "torch.Tensor":
    """Additive float mask [B, 1, T, T] (0 visible, finfo.min hidden), as HF's eager path gets it."""
    visible = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    if segment_ids is not None:
        visible &= segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return torch.from_numpy(mask[:, None])


class TopkRecorder(contextlib.AbstractContextManager):
    """Records the tensor each `Tensor.topk` call ranks (inside the indexer: its scores [B, T, S])."""

    def __enter__(self):
        self.calls, self._orig = [], torch.Tensor.topk
        recorder = self

        def topk(t, *args, **kwargs):
            recorder.calls.append(t.detach().clone())
            return recorder._orig(t, *args, **kwargs)

        torch.Tensor.topk = topk
        return self

    def __exit__(self, *exc):
        torch.Tensor.topk = self._orig
        return False


def hf_attention_forward(attn, config, x: np.ndarray, positions: np.ndarray, segment_ids=None):
    """Attention output [B, T, D], indexer top-k indices [B, T, U] and scores [B, T, S] (masked
    entries hold score + finfo.min), and the query latent c_q [B, T, Q] the indexer read."""
    B, T, _ = x.shape
    rotary = hf_v32.DeepseekV32RotaryEmbedding(config)
    xt, pos = torch.from_numpy(x), torch.from_numpy(np.asarray(positions)).long()
    with torch.no_grad(), TopkRecorder() as rec:
        cos_sin = rotary(xt, pos)
        mask = hf_mask(B, T, segment_ids)
        out, _ = attn(xt, cos_sin, mask, position_ids=pos)
        q_resid = attn.q_a_layernorm(attn.q_a_proj(xt))
        idx = attn.indexer(xt, q_resid, cos_sin, mask[:, 0], pos)
    scores = rec.calls[-1]  # the second indexer call's; the first (inside attn) saw the same
    return out.numpy(), idx.numpy(), scores.numpy(), q_resid.numpy()


def _heads_in(w: np.ndarray, n_heads: int) -> np.ndarray:  # Linear [n*k, in] -> [in, n, k]
    return w.reshape(n_heads, -1, w.shape[-1]).transpose(2, 0, 1)


def hf_tensors(attn, grad: bool = False) -> dict[str, np.ndarray]:
    """The module's parameters (or their gradients; zeros where none flowed) as numpy."""
    pick = (
        (lambda p: p.grad if p.grad is not None else torch.zeros_like(p)) if grad else (lambda p: p)
    )
    return {k: pick(p).detach().numpy().copy() for k, p in attn.named_parameters()}


def params_from_hf(sd: dict[str, np.ndarray], mla, index) -> dict:
    """Our MLA (+ DSA indexer) params from the HF module's tensors; HF name (under `self_attn.`) -> ours:

    q_a_proj.weight [Q, D] -> w_dq [D, Q] (T)          q_a_layernorm.weight -> q_norm/scale
    q_b_proj.weight [N(H+R), Q] -> w_uq [Q, N, H+R]     kv_a_proj_with_mqa.weight -> w_dkv (T)
    kv_a_layernorm.weight -> kv_norm/scale              kv_b_proj.weight -> w_uk, w_uv (as V3)
    o_proj.weight [D, N·O] -> w_o [N, O, D]
    indexer.wq_b.weight [P·Y, Q] -> indexer/w_uq [Q, P, Y]
    indexer.wk.weight [Y, D] -> indexer/w_k [D, Y] (T)
    indexer.k_norm.weight, .bias [Y] -> indexer/k_norm/scale, bias
    indexer.weights_proj.weight [P, D] -> indexer/w_weights [D, P] (T)
    """
    N, H = mla.n_heads, mla.qk_nope_head_dim
    kv_b = sd["kv_b_proj.weight"].reshape(N, H + mla.v_head_dim, mla.kv_lora_rank)
    o = sd["o_proj.weight"]
    return {
        "w_dq": sd["q_a_proj.weight"].T,
        "q_norm": {"scale": sd["q_a_layernorm.weight"]},
        "w_uq": _heads_in(sd["q_b_proj.weight"], N),
        "w_dkv": sd["kv_a_proj_with_mqa.weight"].T,
        "kv_norm": {"scale": sd["kv_a_layernorm.weight"]},
        "w_uk": kv_b[:, :H].transpose(2, 0, 1),
        "w_uv": kv_b[:, H:].transpose(2, 0, 1),
        "w_o": o.reshape(o.shape[0], N, mla.v_head_dim).transpose(1, 2, 0),
        "indexer": {
            "w_uq": _heads_in(sd["indexer.wq_b.weight"], index.index_n_heads),
            "w_k": sd["indexer.wk.weight"].T,
            "k_norm": {"scale": sd["indexer.k_norm.weight"], "bias": sd["indexer.k_norm.bias"]},
            "w_weights": sd["indexer.weights_proj.weight"].T,
        },
    }
