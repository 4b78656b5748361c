"""Bad checkpoints are refused with an error naming the file, tensor or config field, before any
work is spent where possible; an interrupted import leaves nothing that looks like a checkpoint.

Checkpoints here are written from random variables through our own tables (no torch): a tiny V3
in transformers' names and a tiny V4 in DeepSeek's official names, vocabulary cut to 256."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.cli import main
from deepseek_jax.config import load_model_config
from deepseek_jax.convert import table, v3, v4
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.formats import quantize_fp8
from deepseek_jax.convert.importer import abstract_variables, import_checkpoint
from deepseek_jax.convert.safetensors import dtype_name, write_sharded
from tests.utils import CONFIGS


def _write(directory, tensors, config):
    directory.mkdir(parents=True)
    specs = [(n, dtype_name(a.dtype), a.shape) for n, a in tensors.items()]
    write_sharded(directory, specs, tensors.__getitem__, max_shard_bytes=300_000)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _tensors(family, cfg, layout):
    rng = np.random.default_rng(0)
    abstract = abstract_variables(cfg)
    variables = jax.tree.map(
        lambda s: rng.integers(0, cfg.moe.n_routed_experts, s.shape).astype(np.int32)
        if jnp.issubdtype(s.dtype, jnp.integer) else rng.standard_normal(s.shape).astype(np.float32), abstract)
    return table.from_variables(variables, family, cfg, layout)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"v3": (tensors, config.json), "v4": ...}: valid checkpoints as data, written per test."""
    out = {}
    for name, family, layout in (("v3", v3.FAMILY, "hf"), ("v4", v4.FAMILY, "official")):
        cfg = load_model_config([CONFIGS / "model" / f"tiny{'' if name == 'v3' else '_v4'}.yaml"],
                                ["model.vocab_size=256"])  # MTP included: its tensors are written too
        out[name] = (_tensors(family, cfg, layout), family.config_to_json(cfg))
    return out


def _import(tmp_path, tensors, config):
    src = _write(tmp_path / "src", tensors, config)
    return import_checkpoint(src, tmp_path / "out", log=lambda _: None)


def _no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_valid_checkpoints_import(ckpts, tmp_path):
    for name, (tensors, config) in ckpts.items():
        out = import_checkpoint(_write(tmp_path / name, tensors, config), tmp_path / f"{name}_out", log=lambda _: None)
        assert (out / "params").is_dir() and (out / "config.yaml").is_file()


@pytest.mark.parametrize("damage,match", [
    ("missing_shard", r"model-00002-of-\d+\.safetensors"),
    ("truncated", r"model-\d+-of-\d+\.safetensors is truncated: tensor"),
])
def test_damaged_files_are_named(ckpts, tmp_path, damage, match):
    src = _write(tmp_path / "src", *ckpts["v3"])
    shard = src / sorted(p.name for p in src.glob("model-*.safetensors"))[1]
    if damage == "missing_shard":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConversionError, match=match):
        import_checkpoint(src, tmp_path / "out", log=lambda _: None)
    _no_output(tmp_path)


def test_missing_and_unknown_tensors_are_named(ckpts, tmp_path):
    tensors, config = ckpts["v3"]
    bad = dict(tensors)
    del bad["model.layers.2.self_attn.kv_b_proj.weight"]
    bad["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"missing \['model\.layers\.2\.self_attn\.kv_b_proj\.weight'\].*"
                                              r"unexpected \['model\.layers\.0\.self_attn\.extra\.weight'\]"):
        _import(tmp_path, bad, config)
    _no_output(tmp_path)


def test_same_element_count_reshape_is_refused(ckpts, tmp_path):
    tensors, config = ckpts["v3"]
    name = "model.layers.1.self_attn.o_proj.weight"
    bad = {**tensors, name: np.ascontiguousarray(tensors[name].reshape(-1, 32))}
    with pytest.raises(ConversionError, match=rf"{name}: shape \[\d+, 32\], the model needs"):
        _import(tmp_path, bad, config)


@pytest.mark.parametrize("dtype,match", [
    (np.int32, "where the model needs floats"), (ml_dtypes.float8_e4m3fn, "FP8 weight without its scale"),
])
def test_wrong_dtypes_are_refused(ckpts, tmp_path, dtype, match):
    tensors, config = ckpts["v3"]
    name = "model.layers.0.input_layernorm.weight"
    with pytest.raises(ConversionError, match=rf"{name}: .*{match}"):
        _import(tmp_path, {**tensors, name: tensors[name].astype(dtype)}, config)


def test_float_tid2eid_and_out_of_range_ids_are_refused(ckpts, tmp_path):
    tensors, config = ckpts["v4"]
    name = "layers.0.ffn.gate.tid2eid"
    with pytest.raises(ConversionError, match=rf"{name}: dtype F32, the model needs integers"):
        _import(tmp_path / "a", {**tensors, name: tensors[name].astype(np.float32)}, config)
    ids = tensors[name].copy()
    E = config["n_routed_experts"]
    ids[5, 1] = E  # out of range (found while streaming: nothing is left behind)
    with pytest.raises(ConversionError, match=rf"{name}.*outside \[0, {E}\)"):
        _import(tmp_path / "b", {**tensors, name: ids}, config)
    _no_output(tmp_path / "b")


def test_missing_scale_and_nan_scale(ckpts, tmp_path):
    tensors, config = ckpts["v4"]
    name = "layers.1.attn.wq_a.weight"
    q, s = quantize_fp8(name, tensors[name], (16, 16), "ue8m0")
    config = {**config, "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    with pytest.raises(ConversionError, match=rf"{name}: an FP8 weight without its scale"):
        _import(tmp_path / "a", {**tensors, name: q}, config)
    s = s.view(np.uint8).copy()
    s[0, 0] = 255  # E8M0 NaN
    with pytest.raises(ConversionError, match=r"layers\.1\.attn\.wq_a"):
        _import(tmp_path / "b", {**tensors, name: q, "layers.1.attn.wq_a.scale": s.view(ml_dtypes.float8_e8m0fnu)},
                config)
    _no_output(tmp_path / "b")


@pytest.mark.parametrize("field,value", [
    ("scoring_func", "relu"), ("hidden_act", "gelu"), ("tie_word_embeddings", True), ("topk_method", "greedy"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}), ("some_new_feature", 1),
    ("model_type", "deepseek_v9"),
])
def test_config_values_we_do_not_implement_are_named(ckpts, tmp_path, field, value):
    tensors, config = ckpts["v3"]
    with pytest.raises(ConversionError, match=field if field != "rope_parameters" else "rope type 'linear'"):
        _import(tmp_path, tensors, {**config, field: value})


def test_interrupted_import_leaves_nothing(ckpts, tmp_path, monkeypatch):
    from deepseek_jax.convert import source

    calls = {"n": 0}
    load = source.Source.load

    def failing(self, name):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return load(self, name)

    monkeypatch.setattr(source.Source, "load", failing)
    with pytest.raises(KeyboardInterrupt):
        _import(tmp_path, *ckpts["v3"])
    _no_output(tmp_path)


def test_cli_reports_conversion_errors(ckpts, tmp_path, capsys):
    tensors, config = ckpts["v3"]
    src = _write(tmp_path / "src", tensors, {**config, "hidden_act": "gelu"})
    assert main(["convert", "import", str(src), str(tmp_path / "out")]) == 2
    assert "error: config.json: hidden_act = 'gelu'" in capsys.readouterr().err
    shutil.rmtree(src)
    assert main(["convert", "import", str(src), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_quantization_config_as_transformers_saves_it(ckpts, tmp_path):
    """transformers 5.25 writes its whole FineGrainedFP8Config; an FP8 weight may also come as raw U8 bits."""
    tensors, config = ckpts["v3"]
    name = "model.layers.1.self_attn.o_proj.weight"
    q, s = quantize_fp8(name, tensors[name], (128, 128))
    quant = {"quant_method": "fp8", "modules_to_not_convert": None, "modules_to_convert": None,
             "activation_scheme": "dynamic", "weight_block_size": [128, 128], "dequantize": False,
             "scale_fmt": "float", "expert_dtype": "fp8"}
    bad = {**tensors, name: q.view(np.uint8), name.replace(".weight", ".weight_scale_inv"): s}
    out = _import(tmp_path, bad, {**config, "quantization_config": quant})
    assert (out / "params").is_dir()


def test_a_scale_on_an_unquantised_weight_is_refused_before_reading(ckpts, tmp_path):
    tensors, config = ckpts["v3"]
    stray = {**tensors, "model.norm.weight_scale_inv": np.ones((1,), np.float32)}
    with pytest.raises(ConversionError, match=r"model\.norm\.weight in .*scale \(1,\) given for a float32 weight"):
        _import(tmp_path, stray, config)


def test_bfloat16_import_keeps_the_float32_tensors(ckpts, tmp_path):
    from deepseek_jax.convert.orbax_writer import stored_shapes

    tensors, config = ckpts["v4"]
    src = _write(tmp_path / "src", tensors, config)
    out = import_checkpoint(src, tmp_path / "out", dtype="bfloat16", log=lambda _: None)
    dtypes = {k: v[1] for k, v in stored_shapes(out / "params").items()}
    kept = {k: d for k, d in dtypes.items() if k.startswith("router/") or "_hc/" in k or k.endswith(("/sink", "/ape"))}
    assert kept and set(kept.values()) <= {"float32", "int32"}, kept
    assert dtypes["params/embedding"] == "bfloat16"


@pytest.mark.parametrize("family,field", [("v3", "routed_scaling_factor"), ("v3", "n_group"),
                                          ("v4", "swiglu_limit"), ("v4", "hc_mult")])
def test_missing_config_keys_are_named_not_defaulted(ckpts, tmp_path, family, field):
    tensors, config = ckpts[family]
    with pytest.raises(ConversionError, match=rf"missing \['{field}'\]"):
        _import(tmp_path, tensors, {k: v for k, v in config.items() if k != field})


def test_export_refuses_a_model_the_format_cannot_express(tmp_path):
    from deepseek_jax.convert.v3 import config_to_json

    cfg = load_model_config([CONFIGS / "model" / "tiny.yaml"], ["model.moe.swiglu_limit=10", "model.vocab_size=256"])
    with pytest.raises(ConversionError, match=r"model\.moe\.swiglu_limit = 10\.0"):
        config_to_json(cfg)


def test_a_killed_import_s_leftovers_are_removed_by_the_next(ckpts, tmp_path):
    dead = tmp_path / ".out.partial-4194305"  # above the kernel's pid limit: no such process
    (dead / "params").mkdir(parents=True)
    out = _import(tmp_path, *ckpts["v3"])
    assert out.is_dir() and not dead.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
