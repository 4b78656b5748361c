"""Tiny random HF transformers DeepseekV3 models (torch, CPU, float32) as parity references.

Initialised with fan-in scaling (see shared/reference/testing_notes.md): std 0.02 at these widths
makes attention near-uniform and hides layout bugs. Norm weights are 1 + N(0, 0.1) so a converter
that drops them fails, and router biases N(0, 0.02) change the chosen experts for part of the tokens.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deepseek_jax.convert.v3 import config_from_json  # noqa: E402

torch.set_num_threads(1)  # bit-stable torch reference


def tiny_hf_config(q_lora_rank: int | None = 32, **kw) -> dict:
    cfg = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=128,
        rms_norm_eps=1e-6, num_mtp_layers=1, tie_word_embeddings=False,
        rope_parameters=dict(  # YaRN live: T = 64 > original 32, ramp inside the rope dims
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        ),
    )
    cfg.update(kw)
    return cfg


def _fan_in_(t, name: str, gen) -> None:
    with torch.no_grad():
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        elif t.ndim == 1:  # norm weights
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
        elif "embed_tokens" in name:
            t.copy_(torch.randn(t.shape, generator=gen))
        else:  # Linear [out, in] and fused experts [E, out, in]: fan-in is the last dim
            t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)


def build_hf_model(hf_cfg: dict, seed: int = 0):
    """(HF DeepseekV3ForCausalLM, HF MtpModel or None), randomly initialised, float32, eval mode."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**hf_cfg)
    config._attn_implementation = "eager"
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" not in name:
            _fan_in_(t, name, gen)
    mtp = None
    if hf_cfg.get("num_mtp_layers", 0):
        from transformers.modeling_layers import MtpModel

        mtp = MtpModel(model, hf_cfg["num_mtp_layers"]).float().eval()
        for name, t in list(mtp.named_parameters()) + list(mtp.named_buffers()):
            if name.startswith("layers.") and "inv_freq" not in name:
                _fan_in_(t, name, gen)
    return model, mtp


def mtp_state_dict(mtp, n_layers: int) -> dict[str, np.ndarray]:
    """HF MtpModel tensors under the checkpoint names (`model.layers.{n_layers + k}.*`)."""
    out = {}
    for name, t in mtp.state_dict().items():
        if not name.startswith("layers."):
            continue  # embedding / head are the main model's
        _, k, rest = name.split(".", 2)
        rest = rest.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        out[f"model.layers.{n_layers + int(k)}.{rest}"] = t.detach().numpy().copy()
    return out


def hf_state_dict(model, mtp=None) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if "inv_freq" not in k}
    if mtp is not None:
        sd.update(mtp_state_dict(mtp, model.config.num_hidden_layers))
    return sd


def our_config(hf_cfg: dict):
    return config_from_json(hf_cfg, dtype="float32")


class RouterRecorder:
    """Records each HF MoE layer's (router scores with bias, chosen experts) through forward hooks."""

    def __init__(self, model):
        self.records, self.handles = [], []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                self.handles.append(gate.register_forward_hook(self._hook))

    def _hook(self, module, inputs, outputs):
        logits, _, indices = outputs
        choice = logits.sigmoid() + module.e_score_correction_bias
        self.records.append((choice.detach().numpy(), indices.detach().numpy()))

    def close(self):
        for h in self.handles:
            h.remove()


def hf_forward(model, mtp, tokens: np.ndarray):
    """HF main logits [B, T, V] and MTP-depth-1 logits [B, T-1, V] (slot i predicts t_{i+2})."""
    ids = torch.from_numpy(tokens).long()
    with torch.no_grad():
        out = model.model(input_ids=ids)
        h = out.last_hidden_state  # after the final norm, as HF's MTP drafter uses it
        logits = model.lm_head(h)
        mtp_logits = None
        if mtp is not None:
            T = tokens.shape[1]
            pos = torch.arange(1, T)[None].expand(tokens.shape[0], -1)
            h1 = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=ids[:, 1:])
            mtp_logits = mtp._project_to_logits(h1)
    return logits.numpy(), None if mtp_logits is None else mtp_logits.numpy()
