"""Parity with HF transformers' DeepseekV3ForCausalLM (+ its MtpModel) on tiny random fp32 models.

Every V3 path is live: dense and MoE layers, group-limited routing (n_group 4, topk_group 2),
a shared expert, low-rank and full-rank q, YaRN with factor 4 at T = 64 > original 32, batch 2,
router biases that change the selection. Requirements (issue 2): max |Δlogit| <= 1e-4,
KL(HF‖ours) <= 1e-6 per token, routed experts identical in every MoE layer, and the loss and
parameter gradients within rtol 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.convert import table, v3
from deepseek_jax.convert.source import split_fused
from deepseek_jax.models import build_model
from tests.parity.hf_reference import (
    RouterRecorder, build_hf_model, hf_forward, hf_state_dict, our_config, tiny_hf_config, torch,
)
from tests.utils import fuse_experts, kl, per_layer, router_topk_margin

pytestmark = pytest.mark.parity
B, T = 2, 64
VARIANTS = {"q_lora": dict(q_lora_rank=32), "q_full": dict(q_lora_rank=None)}
MIN_MARGIN = 1e-5  # fp32 noise in router scores between the two stacks is ~1e-7


@pytest.fixture(scope="module", params=sorted(VARIANTS), ids=str)
def pair(request):
    hf_cfg = tiny_hf_config(**VARIANTS[request.param])
    model, mtp = build_hf_model(hf_cfg, seed=0)
    cfg = our_config(hf_cfg)
    variables = table.to_variables(split_fused(hf_state_dict(model, mtp)), v3.FAMILY, cfg, "hf")
    tokens = np.random.default_rng(3).integers(0, hf_cfg["vocab_size"], (B, T))  # router margins >= 1e-4
    return model, mtp, cfg, variables, tokens


def test_logits_and_routing_match_hf(pair):
    model, mtp, cfg, variables, tokens = pair
    rec = RouterRecorder(model)
    hf_logits, hf_mtp = hf_forward(model, mtp, tokens)
    rec.close()
    with jax.default_matmul_precision("highest"):
        apply = jax.jit(lambda v, t: build_model(cfg).apply(v, t, mutable=["intermediates"]))
        out, inter = apply(variables, jnp.asarray(tokens))
    logits = np.asarray(out.logits)
    mtp_logits = np.asarray(out.mtp.logits[0][:, :-1])
    d_logit, d_mtp = np.abs(logits - hf_logits).max(), np.abs(mtp_logits - hf_mtp).max()
    kl_main, kl_mtp = kl(hf_logits, logits).max(), kl(hf_mtp, mtp_logits).max()
    print(f"\nmax|Δlogit| main {d_logit:.2e} mtp {d_mtp:.2e}; max KL(HF‖ours) main {kl_main:.2e} mtp {kl_mtp:.2e}")
    assert d_logit <= 1e-4 and d_mtp <= 1e-4
    assert kl_main <= 1e-6 and kl_mtp <= 1e-6

    ours = [np.asarray(a) for a in per_layer(inter["intermediates"], cfg, "ffn", "experts_MA", 0)]
    assert len(rec.records) == cfg.n_moe_layers == len(ours)
    m = cfg.moe
    margins, n_biased = [], 0
    for layer, (choice_ME, hf_experts) in enumerate(rec.records):
        margins.append(router_topk_margin(choice_ME, m.n_activated_experts, m.n_expert_groups, m.n_limited_groups))
        np.testing.assert_array_equal(np.sort(ours[layer], -1), np.sort(hf_experts, -1), f"MoE layer {layer}")
        unbiased = np.sort(np.argsort(-(choice_ME - model.model.layers[cfg.n_dense_layers + layer]
                                       .mlp.gate.e_score_correction_bias.numpy()), -1)[:, :m.n_activated_experts], -1)
        n_biased += (unbiased != np.sort(hf_experts, -1)).any(-1).sum()
    print(f"routing identical in {len(margins)} MoE layers; min top-k margin {min(margins):.1e}; "
          f"{n_biased} token-layers where the bias changed the choice")
    assert min(margins) > MIN_MARGIN
    assert n_biased > 0  # the bias must matter, or the test would not see a misuse of it


def _hf_loss_and_grads(model, mtp, tokens):
    ids = torch.from_numpy(tokens).long()
    model.zero_grad()
    mtp.zero_grad()
    h = model.model(input_ids=ids).last_hidden_state
    ce = torch.nn.functional.cross_entropy
    V = model.config.vocab_size
    loss = ce(model.lm_head(h)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    pos = torch.arange(1, T)[None].expand(B, -1)
    h1 = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=ids[:, 1:])
    loss = loss + 0.3 * ce(mtp._project_to_logits(h1)[:, :-1].reshape(-1, V), ids[:, 2:].reshape(-1))
    loss.backward()
    named = dict(model.named_parameters())
    named.update({f"mtp.{k}": p for k, p in mtp.named_parameters()})
    return loss.item(), {k: None if p.grad is None else p.grad.numpy() for k, p in named.items()}


def _our_loss(params, router, cfg, tokens):
    out = build_model(cfg).apply({"params": params, "router": router}, tokens)
    lp = jax.nn.log_softmax(out.logits[:, :-1])
    loss = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
    lp1 = jax.nn.log_softmax(out.mtp.logits[0][:, :-2])
    return loss + 0.3 * -jnp.take_along_axis(lp1, tokens[:, 2:, None], -1).mean()


GRAD_NAMES = {  # HF parameter -> checkpoint name (MTP tensors live under mtp.layers.0.*)
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.0.self_attn.kv_b_proj.weight": "model.layers.0.self_attn.kv_b_proj.weight",
    "model.layers.0.mlp.down_proj.weight": "model.layers.0.mlp.down_proj.weight",
    "model.layers.2.self_attn.kv_a_proj_with_mqa.weight": "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
    "model.layers.2.mlp.gate.weight": "model.layers.2.mlp.gate.weight",
    "model.layers.3.mlp.experts.gate_up_proj": "model.layers.3.mlp.experts.gate_up_proj",
    "model.layers.3.mlp.shared_experts.down_proj.weight": "model.layers.3.mlp.shared_experts.down_proj.weight",
    "model.layers.1.post_attention_layernorm.weight": "model.layers.1.post_attention_layernorm.weight",
    "mtp.layers.0.eh_proj.weight": "model.layers.4.eh_proj.weight",
    "mtp.layers.0.mtp_block.mlp.experts.down_proj": "model.layers.4.mlp.experts.down_proj",
}


def test_loss_and_gradients_match_hf(pair):
    model, mtp, cfg, variables, tokens = pair
    hf_loss, hf_grads = _hf_loss_and_grads(model, mtp, tokens)
    with jax.default_matmul_precision("highest"):
        loss_and_grad = jax.jit(jax.value_and_grad(_our_loss), static_argnums=2)
        loss, grads = loss_and_grad(variables["params"], variables["router"], cfg, jnp.asarray(tokens))
    grad_vars = {"params": grads, "router": variables["router"]}
    ours = fuse_experts(table.from_variables(grad_vars, v3.FAMILY, cfg, "hf"))  # HF keeps experts fused
    print(f"\nloss HF {hf_loss:.6f} ours {float(loss):.6f}")
    assert abs(float(loss) - hf_loss) <= 1e-4 * abs(hf_loss)
    for hf_name, ckpt_name in GRAD_NAMES.items():
        want, got = hf_grads[hf_name], ours[ckpt_name]
        scale = np.abs(want).max()
        rel = np.abs(got - want).max() / scale
        print(f"  grad {hf_name:55s} max|Δ|/max|g| = {rel:.1e}")
        assert scale > 0, hf_name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=hf_name)
