"""A composition no released model has — MLA with the DSA indexer inside mHC streams, V4-style MoE
(configs/model/tiny_composed.yaml) — built from the same parts as V3 / V3.2 / V4: its blocks are
what the config says, decoding equals its full forward, and it trains in the loop. Its layout
invariance on fsdp_ep is in test_sharding.py (`test_layout_invariance_composed`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_config
from deepseek_jax.metrics import read_metrics
from deepseek_jax.models import LayerKind, build_cache, layer_kinds, layer_segments, router_bias_rows
from deepseek_jax.run import run
from tests.utils import ROOT, TOL, assert_close

SMALL = ["model.vocab_size=512", "model.n_layers=3", "model.index.index_topk=8"]


@pytest.fixture(scope="module")
def composed(tiny_model):
    return tiny_model("tiny_composed", SMALL, T=24)


def test_blocks_are_composed_from_the_config(composed):
    cfg, model, variables, tokens = composed
    kinds = layer_kinds(cfg)
    assert kinds == [LayerKind("dsa", 0, "dense"), LayerKind("dsa", 0, "hash"), LayerKind("dsa", 0, "moe")]
    assert [s.name for s in layer_segments(kinds)] == ["layers_0", "layers_1", "layers_2"]
    block = variables["params"]["layers_1"]["block_0"]
    assert {"attn_hc", "attn_norm", "attn", "ffn_hc", "ffn_norm", "ffn"} <= set(block)  # mHC residual
    assert "indexer" in block["attn"] and "w_uk" in block["attn"]  # MLA with the DSA indexer
    assert "tid2eid" in variables["router"]["layers_1"]["block_0"]["ffn"]  # hash-routed MoE
    assert {"w_e", "w_h", "hc_head"} <= set(variables["params"]["mtp_0"])  # the stream MTP
    assert [r.path for r in router_bias_rows(cfg)] == [
        ("layers_2", "block_0", "ffn", "bias"), ("mtp_0", "block", "ffn", "bias")]
    out = jax.jit(lambda v, t: model.apply(v, t, index_loss=True))(variables, tokens)  # eager: ~11 s
    assert out.routing.counts.shape == (2, cfg.moe.n_routed_experts)  # the hash and the learned layer
    assert out.index_loss.shape == (3,) and out.mtp.index_loss.shape == (1,)
    assert bool(jnp.all(out.index_loss > 0))


def test_decoding_matches_full_forward(composed):
    cfg, model, variables, tokens = composed
    B, T = tokens.shape
    assert T > cfg.index.index_topk  # the sparse selection is live in both paths
    with jax.default_matmul_precision("highest"):
        full = jax.jit(lambda v, t: model.apply(v, t, mtp=False).logits)(variables, tokens)
        step = jax.jit(lambda v, t, c, i: (lambda o: (o.logits, o.cache))(model.apply(v, t, cache=c, cache_index=i)))
        cache = build_cache(cfg, B, max_len=T + 4)
        logits, cache = step(variables, tokens[:, :9], cache, jnp.int32(0))
        pieces = [logits]
        for t in range(9, T):
            logits, cache = step(variables, tokens[:, t : t + 1], cache, jnp.int32(t))
            pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    print(f"\ncomposed decode vs full forward: max|Δlogit| = {float(jnp.abs(decoded - full).max()):.2e}")
    assert_close(decoded, full, **TOL["model_f32"], what="composed decode logits")


@pytest.mark.slow
def test_trains_in_the_loop(tmp_path, corpus):
    overrides = [
        *SMALL, "model.dim=64", "model.n_layers=2", "model.max_seq_len=64", f"data.source={corpus}",
        "data.tokenizer_vocab_size=300", "data.seq_len=32", "data.global_batch_size=4", "data.val_fraction=0.1",
        "optim.lr=3e-3", "optim.warmup_steps=2", "train.steps=20", f"train.run_dir={tmp_path / 'run'}",
        "train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.ckpt_every=20",
        "train.async_checkpoints=false", "train.sample_prompts=[]", "train.peak_flops=1e11",
    ]
    cfg = load_config([ROOT / "configs/train/tiny_composed_stdlib.yaml", ROOT / "configs/mesh/single.yaml"], overrides)
    out = run(cfg)
    losses = {r["step"]: r for r in read_metrics(tmp_path / "run") if r["split"] == "train"}
    first = np.mean([losses[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([losses[s]["loss"] for s in (18, 19, 20)])
    print(f"\ncomposed model: loss steps 1-3 {first:.3f} -> 18-20 {last:.3f}; eval {out['eval']['loss']:.3f}")
    assert last < first - 0.5 and np.isfinite(out["eval"]["loss"])
    assert losses[20]["index_loss"] > 0 and losses[20]["bias_max"] > losses[20]["bias_min"]
