"""The V3 / V3.2 rule table (convert/v3.py) in transformers' layout, in memory: round trips both
ways, the per-expert on-disk and fused in-memory expert layouts, and errors that name tensors."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_model_config, to_dict
from deepseek_jax.convert import table, v3
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.importer import abstract_variables, check_tensors
from deepseek_jax.convert.safetensors import write_file
from deepseek_jax.convert.source import open_source, split_fused
from deepseek_jax.models import build_model
from tests.utils import CONFIGS, fuse_experts

TINY = CONFIGS / "model/tiny.yaml"
TINY_V32 = CONFIGS / "model/tiny_v32.yaml"


def random_variables(cfg, seed=0):
    """Random numpy variables with the model's exact tree (from eval_shape; nothing compiled)."""
    abstract = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)
    abstract = {k: v for k, v in abstract.items() if k in ("params", "router")}
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def variables_to_hf(variables, cfg, fused: bool = False) -> dict:
    """Our variables -> transformers' names: per-expert (on disk), or fused experts (in memory)."""
    state = table.from_variables(variables, v3.FAMILY, cfg, "hf")
    return fuse_experts(state) if fused else state


def hf_to_variables(state, cfg) -> dict:
    """A transformers state dict (fused or per-expert experts) -> our variables."""
    return table.to_variables(split_fused(state), v3.FAMILY, cfg, "hf")


@pytest.fixture(scope="module", params=[64, 0], ids=["q_lora", "q_full"])
def cfg(request):
    base = load_model_config([TINY])
    return dataclasses.replace(base, mla=dataclasses.replace(base.mla, q_lora_rank=request.param))


def test_ours_to_hf_to_ours_is_exact(cfg):
    variables = random_variables(cfg)
    for fused in (False, True):
        hf = variables_to_hf(variables, cfg, fused=fused)
        back = hf_to_variables(hf, cfg)
        jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_hf_names_cover_every_parameter_once(cfg):
    variables = random_variables(cfg)
    hf = variables_to_hf(variables, cfg, fused=True)
    n_ours = sum(x.size for x in jax.tree.leaves(variables))
    assert sum(x.size for x in hf.values()) == n_ours
    L = cfg.n_layers
    assert f"model.layers.{L}.eh_proj.weight" in hf  # MTP at index n_layers
    assert f"model.layers.{L}.mlp.experts.gate_up_proj" in hf
    assert hf[f"model.layers.{L - 1}.mlp.experts.gate_up_proj"].shape == (
        cfg.moe.n_routed_experts, 2 * cfg.moe.moe_inter_dim, cfg.dim,
    )
    assert ("model.layers.0.self_attn.q_a_proj.weight" in hf) == (cfg.mla.q_lora_rank > 0)


def test_per_expert_layout_fuses_back():
    cfg = load_model_config([TINY])
    per_expert = variables_to_hf(random_variables(cfg), cfg)
    fused = fuse_experts(per_expert)
    split = split_fused(fused)
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in split
    assert split.keys() == per_expert.keys()
    for k in per_expert:
        np.testing.assert_array_equal(split[k], per_expert[k])
    refused = fuse_experts(split)
    assert refused.keys() == fused.keys()
    for k in fused:
        np.testing.assert_array_equal(refused[k], fused[k])


def test_official_checkpoint_copies_of_embedding_and_head_are_skipped():
    cfg = load_model_config([TINY])
    variables = random_variables(cfg)
    hf = variables_to_hf(variables, cfg, fused=True)
    L = cfg.n_layers
    hf[f"model.layers.{L}.embed_tokens.weight"] = hf["model.embed_tokens.weight"]
    hf[f"model.layers.{L}.shared_head.head.weight"] = hf["lm_head.weight"]
    jax.tree.map(np.testing.assert_array_equal, hf_to_variables(hf, cfg), variables)


@pytest.fixture(scope="module")
def tiny_hf():
    """(config, per-expert state dict: the on-disk layout)."""
    cfg = load_model_config([TINY])
    return cfg, variables_to_hf(random_variables(cfg), cfg)


def test_missing_tensor_is_named(tiny_hf):
    cfg, hf = tiny_hf
    hf = dict(hf)
    del hf["model.layers.2.self_attn.kv_b_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing \['model\.layers\.2\.self_attn\.kv_b_proj\.weight'\]"):
        hf_to_variables(hf, cfg)


def test_unexpected_tensor_is_named(tiny_hf):
    cfg, hf = tiny_hf
    hf = dict(hf, **{"model.layers.9.self_attn.o_proj.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected \['model\.layers\.9\.self_attn\.o_proj\.weight'\]"):
        hf_to_variables(hf, cfg)


def test_wrong_shape_is_named(tiny_hf, tmp_path):
    """Shapes are checked against the model when a checkpoint directory is opened for import."""
    cfg, hf = tiny_hf
    hf = dict(hf)
    hf["model.norm.weight"] = np.ones((cfg.dim + 1,), np.float32)
    write_file(tmp_path / "model.safetensors", hf)
    (tmp_path / "config.json").write_text(json.dumps(v3.config_to_json(cfg)))
    src = open_source(tmp_path)
    try:
        with pytest.raises(ConversionError, match=r"model\.norm\.weight: shape \[129\], the model needs \[128\]"):
            check_tensors(src, abstract_variables(src.cfg))
    finally:
        src.files.close()


def test_missing_expert_is_named(tiny_hf):
    cfg, hf = tiny_hf
    split = dict(hf)
    del split["model.layers.3.mlp.experts.7.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing \['model\.layers\.3\.mlp\.experts\.7\.up_proj\.weight'\]"):
        hf_to_variables(split, cfg)


@pytest.mark.parity
def test_save_pretrained_safetensors_load(tmp_path):
    """What transformers writes to disk (per-expert, safetensors) loads and gives HF's logits."""
    from safetensors.numpy import load_file

    from tests.parity.hf_reference import build_hf_model, hf_forward, our_config, tiny_hf_config

    hf_cfg = tiny_hf_config(num_mtp_layers=0)
    model, _ = build_hf_model(hf_cfg)
    model.save_pretrained(tmp_path)
    state = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        state.update(load_file(f))
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in state)  # the on-disk layout
    cfg = our_config(hf_cfg)
    variables = hf_to_variables(state, cfg)
    tokens = np.random.default_rng(0).integers(0, hf_cfg["vocab_size"], (2, 16))
    want, _ = hf_forward(model, None, tokens)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda v, t: build_model(cfg).apply(v, t).logits)(variables, tokens)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3.2: the indexer rows (every layer, MTP included) and config.json


def test_v32_round_trip_and_indexer_names():
    cfg = load_model_config([TINY_V32])
    variables = random_variables(cfg)
    hf = variables_to_hf(variables, cfg)
    jax.tree.map(np.testing.assert_array_equal, hf_to_variables(hf, cfg), variables)
    assert sum(x.size for x in hf.values()) == sum(x.size for x in jax.tree.leaves(variables))
    ic, Q, D = cfg.index, cfg.mla.q_lora_rank, cfg.dim
    P, Y = ic.index_n_heads, ic.index_head_dim
    want = {"wq_b.weight": (P * Y, Q), "wk.weight": (Y, D), "k_norm.weight": (Y,), "k_norm.bias": (Y,),
            "weights_proj.weight": (P, D)}
    for i in range(cfg.n_layers + cfg.num_nextn_predict_layers):  # the MTP layer has one too
        for name, shape in want.items():
            assert hf[f"model.layers.{i}.self_attn.indexer.{name}"].shape == shape, (i, name)
    # head p of wq_b is rows [p·Y, (p+1)·Y): our w_uq[:, p, :]
    w_uq = variables["params"]["layers_1_3"]["block_0"]["attn"]["indexer"]["w_uq"][0]
    np.testing.assert_array_equal(hf["model.layers.1.self_attn.indexer.wq_b.weight"][Y : 2 * Y], w_uq[:, 1, :].T)
    # a V3.2 checkpoint is not a V3 one: the indexer tensors are unexpected there
    with pytest.raises(ConversionError, match=r"unexpected \[.*indexer"):
        hf_to_variables(hf, load_model_config([TINY]))


@pytest.mark.parametrize("path", [TINY, TINY_V32], ids=["v3", "v32"])
def test_hf_config_json_round_trip(path):
    """config_to_json -> config_from_json gives our config back, except the fields HF
    does not hold (compute dtype, MoE implementation, DSA training stage and query blocks)."""
    cfg = load_model_config([path])
    hf = v3.config_to_json(cfg)
    assert hf["model_type"] == ("deepseek_v32" if cfg.index else "deepseek_v3")
    assert ("index_topk" in hf) == (cfg.index is not None)
    back = v3.config_from_json(hf, dtype=cfg.dtype)
    compute_only = {"impl", "dispatch", "capacity_factor", "index_dense_warmup", "index_q_block"}

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in compute_only}

    assert strip(to_dict(back)) == strip(to_dict(cfg))
