"""The DeepSeek-V4.1 checkpoint family (convert/v41.py): names, storage, config.json, both directions.

- Full size (configs/model/deepseek_v41_flash.yaml, nothing allocated): the official entries with the
  release's storage give exactly the inventory of shared/reference/deepseek_v41_architecture.md §4.1:
  96,085 keys (2,401 under `mtp.`; 266 vision / aligner / delimiter keys, §4.2: patch embed 2, 32 ViT
  blocks × 8, final norm 1, aligner 4, delimiters 3: tests/convert/test_v41_vision.py); sampled shapes and dtypes.
- Tiny (configs/model/tiny_v41.yaml, random weights): every layout round-trips exactly in memory and
  through `convert import` / `convert export` files; the release-format quantised export (FP8 32×32,
  FP4 experts, FP8 Engram rows 1×32, all E8M0) imports to exactly its own dequantised values; Engram
  padding rows stay zero; vision tensors are skipped with one note.
- config.json (composite, bare text, flat inference/config.json) both ways; strict on keys and values.
- `convert export --quant fp8` (and `release`): every tensor's dtype and shape is the release inventory's,
  its bytes `quantize_as_released`'s (the tables written in row chunks); export -> import -> export is
  byte-identical; `--layout hf` is refused saying why.
- tests/golden/v41/weights.safetensors (transformers' text-only revision, in memory) maps name for name
  through "hf_text" onto the model built from its config.json.
"""

import dataclasses
import functools
import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.convert import table, v41
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.exporter import export_checkpoint
from deepseek_jax.convert.formats import dequant
from deepseek_jax.convert.importer import abstract_variables, expected_shape, import_checkpoint
from deepseek_jax.convert.orbax_writer import restore_tree
from deepseek_jax.convert.safetensors import SafetensorsDir
from deepseek_jax.convert.source import family_of, open_source, split_fused
from deepseek_jax.models import converter
from tests.utils import CONFIGS, ROOT, assert_trees_equal, random_variables, read_safetensors_dir, write_checkpoint

GOLDEN = ROOT / "tests" / "golden" / "v41"
RELEASE_KEYS, RELEASE_MTP_KEYS, VISION_KEYS = 96_085, 2_401, 2 + 32 * 8 + 1 + 4 + 3
SCHEDULE = ("compress_ratios", "kv_source_layer_ids", "index_source_layer_ids", "candidate_source_layer_id")
FLASH_TEXT = {  # the released config.json's text_config (as quoted by a third-party test; reference §1.1)
    "model_type": "deepseek_v41_text", "vocab_size": 129280, "hidden_size": 5120, "moe_intermediate_size": 2304,
    "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1280, "o_lora_rank": 1024, "o_groups": 8, "hidden_act": "silu",
    "swiglu_limit": 10.0, "rms_norm_eps": 1e-20, "tie_word_embeddings": False, "max_position_embeddings": 1048576,
    "rope_theta": 10000, "rope_scaling": {"rope_type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                                          "original_max_position_embeddings": 65536},
    "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "sliding_window": 128,
    "compress_ratios": [0, 0] + [2] * 18 + [1] * 20 + [0, 0, 0], "compress_rope_theta": 160000,
    "kv_source_layer_ids": [2, 8, 14, 20], "index_source_layer_ids": [2, 8, 14, 20, 24, 28, 32, 36],
    "index_n_heads": 32, "index_head_dim": 128, "index_topk": 512, "candidate_source_layer_id": 20,
    "candidate_topk_blocks": 2048, "candidate_block_size": 8, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06,
    "engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682], "engram_max_ngram_size": 4,
    "engram_vocab_size": 16000000, "engram_n_heads": 8, "engram_head_dim": 256, "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99092, "num_nextn_predict_layers": 3, "dspark_block_size": 5,
    "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [37, 38, 39], "dspark_markov_rank": 256,
    "dspark_n_routed_experts": 128, "dspark_num_experts_per_tok": 3,
}  # fmt: skip
FLASH_CONFIG = {
    "architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "image_token_id": 129264,
    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
                            "scale_fmt": "ue8m0", "expert_dtype": "fp4"},
    "text_config": FLASH_TEXT,
    "vision_config": {"model_type": "deepseek_v41_vision", "num_hidden_layers": 32, "hidden_size": 1024},
}  # fmt: skip
FLASH_INFERENCE = {  # inference/config.json, verbatim as quoted by the same third-party test
    "vocab_size": 129280, "dim": 5120, "moe_inter_dim": 2304, "n_layers": 40, "n_mtp_layers": 3,
    "dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [37, 38, 39],
    "dspark_markov_rank": 256, "dspark_n_routed_experts": 128, "dspark_n_activated_experts": 3, "n_heads": 64,
    "n_routed_experts": 384, "n_shared_experts": 1, "n_activated_experts": 6, "score_func": "sqrtsoftplus",
    "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1280, "head_dim": 512, "rope_head_dim": 64,
    "norm_eps": 1e-20, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "kv_source_layers": [2, 8, 14, 20],
    "index_source_layers": [2, 8, 14, 20, 24, 28, 32, 36], "original_seq_len": 65536, "rope_theta": 10000,
    "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 32, "index_head_dim": 128,
    "index_topk": 512, "candidate_source_layer": 20, "candidate_topk_blocks": 2048, "candidate_block_size": 8,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06, "engram_layer_ids": [1, 14],
    "engram_vocab_size": 16000000, "engram_num_embeddings": [384006168, 384016682], "engram_max_ngram_size": 4,
    "engram_pad_id": 2, "engram_compressed_vocab_size": 99092, "dtype": "fp8", "expert_dtype": "fp4",
    "compress_rope_theta": 160000, "compress_ratios": [0, 0] + [2] * 18 + [1] * 20 + [0, 0, 0],
    "vision_n_layers": 32, "vision_dim": 1024, "vision_n_heads": 16, "vision_inter_dim": 2816,
    "vision_patch_size": 14, "vision_downsample_ratio": 3, "vision_max_n_token": 1024, "vision_min_pixels": 295936,
    "vision_max_wh_ratio": None, "image_token_id": 129264, "engram_n_heads": 8, "engram_head_dim": 256,
    "vision_rope_theta": 10000,
}  # fmt: skip


def _cfg(name: str):
    return load_model_config([CONFIGS / "model" / f"{name}.yaml"])


def _like(cfg, ours):
    """`cfg` with `ours`' values of the fields config.json does not carry (compute choices, unused inter_dim)."""
    return dataclasses.replace(
        cfg, dtype=ours.dtype, inter_dim=ours.inter_dim, remat=ours.remat, quant_sim=ours.quant_sim,
        moe=dataclasses.replace(cfg.moe, impl=ours.moe.impl, dispatch=ours.moe.dispatch,
                                capacity_factor=ours.moe.capacity_factor),
        v4=dataclasses.replace(cfg.v4, q_block=ours.v4.q_block),
        shared_kv=dataclasses.replace(cfg.shared_kv, qat=ours.shared_kv.qat),
    )


# ----------------------------------------------------------------------------------------------
# (a) full size


@pytest.fixture(scope="module")
def flash():
    cfg = _cfg("deepseek_v41_flash")
    ents = table.entries(v41.FAMILY, cfg)
    abstract = abstract_variables(cfg)
    return cfg, ents, abstract, [expected_shape(e, abstract, cfg) for e in ents]


@pytest.mark.slow  # the inner loop keeps the in-memory round trips
def test_full_size_official_inventory(flash):
    cfg, ents, abstract, shapes = flash
    assert converter(cfg) is v41.FAMILY
    stored = {n: (d, s) for e, shape in zip(ents, shapes) for n, d, s in v41.release_specs(e.name("official"), shape)}
    assert len(stored) == RELEASE_KEYS
    assert sum(n.startswith(("vision.", "aligner.", "image_")) for n in stored) == VISION_KEYS
    assert sum(n.startswith("mtp.") for n in stored) == RELEASE_MTP_KEYS
    want = {
        "layers.20.attn.wq_b.weight": ("F8_E4M3", (32768, 1280)), "layers.20.attn.wq_b.scale": ("F8_E8M0", (1024, 40)),
        "layers.5.ffn.experts.7.w1.weight": ("I8", (2304, 2560)),
        "layers.5.ffn.experts.7.w1.scale": ("F8_E8M0", (2304, 160)),
        "layers.39.ffn.experts.383.w2.weight": ("I8", (5120, 1152)),
        "layers.1.engram.embed.weight": ("F8_E4M3", (384006168, 256)),
        "layers.14.engram.embed.scale": ("F8_E8M0", (384016682, 8)),
        "layers.14.engram.wkv.weight": ("F8_E4M3", (25600, 6144)),
        "layers.14.engram.wkv.scale": ("F8_E8M0", (800, 192)),
        "layers.1.engram.q_weight": ("BF16", (4, 5120)), "layers.2.attn.compressor.wgate.weight": ("BF16", (512, 5120)),
        "layers.24.attn.indexer.wq_b.scale": ("F8_E8M0", (128, 40)),
        "layers.20.attn.indexer.wk.weight": ("BF16", (128, 512)),
        "layers.0.hc_attn_fn": ("F32", (24, 20480)), "layers.7.ffn.gate.bias_vl": ("F32", (384,)),
        "layers.3.attn.attn_sink": ("F32", (64,)), "mtp.0.main_proj.scale": ("F8_E8M0", (160, 480)),
        "mtp.1.ffn.gate.weight": ("BF16", (128, 5120)), "mtp.2.confidence_head.proj.weight": ("BF16", (1, 5376)),
        "mtp.2.markov_head.head.weight": ("BF16", (129280, 256)), "head.weight": ("BF16", (129280, 5120)),
    }  # fmt: skip
    assert {n: stored[n] for n in want} == want
    # the only kv / index / Reindex extras: compressor on 2, 8, 14, 20 (wgate not on 20); indexer queries on 24..36
    gates = {f"layers.{i}.attn.compressor.wgate.weight" for i in (2, 8, 14)}
    assert {n for n in stored if "compressor.wgate" in n} == gates
    keys = {f"layers.{i}.attn.indexer.wk.weight" for i in (2, 8, 14, 20)}
    assert {n for n in stored if n.endswith("indexer.wk.weight")} == keys
    queries = {f"layers.{i}.attn.indexer.wq_b.weight" for i in (2, 8, 14, 20, 24, 28, 32, 36)}
    assert {n for n in stored if n.endswith("indexer.wq_b.weight") and n.startswith("layers.")} == queries
    assert not any("hc_head" in n or ".ape" in n or "tid2eid" in n for n in stored)


def test_full_size_every_layout_is_a_bijection(flash):
    cfg, ents, abstract, _ = flash
    for layout in v41.FAMILY.layouts:
        assert len({e.name(layout) for e in ents}) == len(ents), layout
    covered = table.leaf_pieces(ents)
    assert {p for p, _ in table.iter_leaves(abstract)} == set(covered)
    for leaf, pieces in covered.items():  # every slice filled once: expert / repeat indices distinct
        assert len({idx for idx, _, k in pieces}) == len(pieces), leaf


# ----------------------------------------------------------------------------------------------
# (b) tiny: random weights through every layout, files and quantised storage


@pytest.fixture(scope="module")
def tiny():
    cfg = _cfg("tiny_v41")
    abstract, variables = random_variables(cfg)
    return cfg, abstract, variables


def _fused(state: dict) -> dict:
    """Per-expert hf names -> transformers' fused `mlp.experts.gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F]."""
    out, groups = {}, {}
    for n, a in state.items():
        head, sep, rest = n.partition(".mlp.experts.")
        if sep and rest.split(".")[0].isdigit():
            e, kind = rest.split(".")[:2]
            groups.setdefault(head, {})[(kind, int(e))] = a
        else:
            out[n] = a
    for head, parts in groups.items():
        E = 1 + max(e for _, e in parts)
        out[f"{head}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([parts["gate_proj", e], parts["up_proj", e]]) for e in range(E)])
        out[f"{head}.mlp.experts.down_proj"] = np.stack([parts["down_proj", e] for e in range(E)])
    return out


@pytest.mark.parametrize("layout", v41.LAYOUTS)
def test_tiny_round_trip_in_memory(tiny, layout):
    cfg, _, variables = tiny
    state = table.from_variables(variables, v41.FAMILY, cfg, layout)
    if layout == "hf":  # transformers holds the experts fused
        state = split_fused(_fused(state))
    assert_trees_equal(table.to_variables(state, v41.FAMILY, cfg, layout), variables)
    rows = cfg.engram.num_embeddings[0]
    table_name = {"official": "layers.1.engram.embed.weight", "hf_text": "model.layers.1.engram.embed.weight",
                  "hf": "model.language_model.engram_tables.1.weight"}[layout]
    assert state[table_name].shape == (rows, cfg.engram.head_dim)  # the release's rows, no padding


@pytest.mark.slow  # the inner loop keeps the in-memory round trips
def test_tiny_files_import_export(tiny, tmp_path):
    """official float32 files -> import -> export official and hf_text: every tensor back bit for bit;
    nonzero padding rows in our table never reach a file, and import pads with zeros."""
    cfg, abstract, variables = tiny
    padded = jax.tree.map(np.copy, variables)
    padded["params"]["layers_1"]["block_0"]["engram"]["table"][:, cfg.engram.num_embeddings[0]:] = 7.0
    state = table.from_variables(padded, v41.FAMILY, cfg, "official")
    notes = []
    out = import_checkpoint(write_checkpoint(tmp_path / "src", state, v41.config_to_json(cfg)), tmp_path / "ours",
                            log=notes.append)
    assert not any("MTP" in n or "skipped" in n for n in notes), notes
    assert_trees_equal(restore_tree(out / "params", abstract), variables)
    for layout in ("official", "hf_text"):
        exported = export_checkpoint(out, tmp_path / layout, layout=layout, max_shard_bytes=400_000,
                                     log=lambda _: None)
        want = table.from_variables(variables, v41.FAMILY, cfg, layout)
        got = read_safetensors_dir(exported)
        assert sorted(got) == sorted(want)
        for n, a in want.items():
            np.testing.assert_array_equal(got[n], a, n)
        back = v41.config_from_json(json.loads((exported / "config.json").read_text()))
        assert _like(back, cfg) == cfg


def test_tiny_release_format_imports_exactly(tiny, tmp_path):
    """FP8 32×32, FP4 experts, FP8 tables with 1×32 row scales (E8M0), BF16 / F32 as released: the import
    equals the stored values dequantised; vision tensors are skipped with one note."""
    cfg, abstract, variables = tiny
    official = table.from_variables(variables, v41.FAMILY, cfg, "official")
    stored = {k: a for n, w in official.items() for k, a in v41.quantize_as_released(n, w).items()}
    kinds = {n: v41.stored_as(n) for n in official}
    assert {"fp4", "fp8", "table", "f32", "bf16"} <= set(kinds.values())
    assert stored["layers.1.engram.embed.scale"].shape == (cfg.engram.num_embeddings[0], cfg.engram.head_dim // 32)
    assert stored["layers.1.engram.embed.weight"].dtype == ml_dtypes.float8_e4m3fn
    assert stored["layers.0.ffn.experts.0.w1.weight"].dtype == np.int8
    assert stored["layers.0.attn.wq_b.scale"].dtype == ml_dtypes.float8_e8m0fnu
    bf16 = ml_dtypes.bfloat16
    vision = {"vision.blocks.0.attn.wqkv.weight": np.ones((96, 32), bf16), "aligner.w1.bias": np.ones((128,), bf16),
              "image_newline": np.ones((128,), bf16)}
    config = {**v41.config_to_json(cfg), "quantization_config": FLASH_CONFIG["quantization_config"]}
    notes = []
    src = write_checkpoint(tmp_path / "src", {**stored, **vision}, config)
    out = import_checkpoint(src, tmp_path / "ours", log=notes.append)
    assert sum("vision" in n for n in notes) == 1, notes
    want = {}
    for n, kind in kinds.items():
        scale = n.removesuffix(".weight") + ".scale"
        want[n] = (dequant(n, stored[n], stored[scale], config_block=(32, 32), fp4=kind == "fp4")
                   if kind in ("fp4", "fp8", "table") else stored[n].astype(np.float32))
    got = restore_tree(out / "params", abstract)
    assert_trees_equal(got, table.to_variables(want, v41.FAMILY, cfg, "official"))
    tbl = np.asarray(got["params"]["layers_1"]["block_0"]["engram"]["table"])[0]
    assert tbl.shape[0] % 1024 == 0 and not tbl[cfg.engram.num_embeddings[0]:].any()  # padding rows zero
    # FP8 / FP4 values differ from the float32 originals, but by the formats' rounding only
    w = np.asarray(variables["params"]["layers_0"]["block_0"]["attn"]["w_dq"])
    assert 0 < np.abs(np.asarray(got["params"]["layers_0"]["block_0"]["attn"]["w_dq"]) - w).max() <= np.abs(w).max() / 8


def test_hf_text_file_with_the_unused_table_scale(tiny, tmp_path):
    """transformers' text model keeps `engram.embed.scale` (ones) next to a float table: read as a name of its
    own (skipped), never folded into the table as an FP8 scale. It holds no DSpark: converted without it."""
    cfg, _, variables = tiny
    state = {n: a for n, a in table.from_variables(variables, v41.FAMILY, cfg, "hf_text").items()
             if not n.startswith("mtp.")}
    ones = {f"model.layers.{i}.engram.embed.scale": np.ones((n, cfg.engram.head_dim // 32), np.float32)
            for i, n in zip(cfg.engram.layer_ids, cfg.engram.num_embeddings)}
    src = open_source(write_checkpoint(tmp_path / "src", {**state, **ones}, v41.config_to_json(cfg)))
    assert src.layout == "hf_text" and src.refs["model.layers.1.engram.embed.weight"].scale is None
    assert src.cfg.dspark is None and src.cfg.num_nextn_predict_layers == 0
    assert [n for n in src.notes if "no MTP" in n]
    name = "model.layers.4.engram.embed.weight"
    np.testing.assert_array_equal(src.load(name), state[name])


# ----------------------------------------------------------------------------------------------
# (c) config.json


@pytest.mark.parametrize("name", ["tiny_v41", "deepseek_v41_flash"])
def test_config_json_round_trip(name):
    cfg = _cfg(name)
    hf = json.loads(json.dumps(v41.config_to_json(cfg)))
    assert family_of(hf) is v41.FAMILY
    assert _like(v41.config_from_json(hf), cfg) == cfg
    assert _like(v41.config_from_json(hf["text_config"], vision=cfg.vision), cfg) == cfg  # a bare text config


def test_released_config_forms_give_the_flash_yaml():
    cfg = _cfg("deepseek_v41_flash")
    assert family_of(FLASH_INFERENCE) is v41.FAMILY
    for hf in (FLASH_CONFIG, FLASH_INFERENCE):
        assert _like(v41.config_from_json(hf), cfg) == cfg
    text = {k: v for k, v in FLASH_TEXT.items() if k not in SCHEDULE}  # (bare text configs carry no vision)
    assert _like(v41.config_from_json(text, vision=cfg.vision), cfg) == cfg  # the defaults give the released schedule
    mtp = {**FLASH_TEXT, "compress_ratios": FLASH_TEXT["compress_ratios"][:40]}  # with or without DSpark entries
    assert _like(v41.config_from_json(mtp, vision=cfg.vision), cfg) == cfg
    no_mtp = v41.config_from_json(FLASH_CONFIG, num_nextn_predict_layers=0)
    assert no_mtp.dspark is None and len(no_mtp.compress_ratios) == 40


def test_default_schedule_of_a_tiny_config():
    """Absent lists (n != 40): [0]*2 + [2]*⌈(n-2)/2⌉ + [1]*rest, a kv source per run, index = kv, candidate = last."""
    text = {k: v for k, v in FLASH_TEXT.items() if k not in (*SCHEDULE, "dspark_target_layer_ids")}
    cfg = v41.config_from_json({**text, "num_hidden_layers": 9, "engram_layer_ids": [1, 4],
                                "engram_num_embeddings": [10, 20]})
    assert cfg.compress_ratios == (0, 0, 2, 2, 2, 2, 1, 1, 1, 0, 0, 0)
    s = cfg.shared_kv
    assert (s.kv_source_layers, s.index_source_layers, s.candidate_source_layer) == ((2, 6), (2, 6), 6)
    assert cfg.dspark.target_layers == (5, 7, 8)  # the last three layers that are not kv sources


@pytest.mark.parametrize("change,match", [
    ({"sliding_window_v2": 1}, r"sliding_window_v2"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu'"),
    ({"num_hash_layers": 3}, r"num_hash_layers = 3"),
    ({"engram_pad_id": 3}, r"engram_pad_token_id and engram_pad_id disagree"),
    ({"compress_ratios": [0] * 41}, r"compress_ratios: 41 entries"),
    ({"layer_types": ["sliding_attention"] * 40}, r"layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 16, "attention_factor": 0.5}}, r"attention_factor"),
    ({"kv_source_layer_ids": [8, 14, 20]}, r"layer 2 .*no kv source"),
])  # fmt: skip
def test_bad_config_names_the_field(change, match):
    with pytest.raises(Exception, match=match):
        v41.config_from_json({**FLASH_CONFIG, "text_config": {**FLASH_TEXT, **change}})


def test_top_level_keys_are_strict_and_guard_refuses_other_models():
    with pytest.raises(ConversionError, match=r"vision_tower_v2"):
        v41.config_from_json({**FLASH_CONFIG, "vision_tower_v2": {}})
    cfg = _cfg("tiny_v41")
    for bad, field in ((dataclasses.replace(cfg, mhc=dataclasses.replace(cfg.mhc, single_pass=False)), "single_pass"),
                       (dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, vl_bias=False)), "vl_bias"),
                       (dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, seed=1)), "engram.seed")):
        with pytest.raises(ConversionError, match=field):
            v41.config_to_json(bad)


# ----------------------------------------------------------------------------------------------
# (d) transformers' text-only model (golden fixture)


@pytest.mark.skipif(not (GOLDEN / "weights.safetensors").is_file(), reason="no tests/golden/v41 fixture")
def test_golden_hf_text_names_and_tree():
    from safetensors.numpy import load_file

    state = load_file(GOLDEN / "weights.safetensors")
    hf = json.loads((GOLDEN / "config.json").read_text())
    cfg = v41.config_from_json(hf, dtype="float32", num_nextn_predict_layers=0)  # transformers holds no DSpark
    names = {e.name("hf_text") for e in table.entries(v41.FAMILY, cfg)}
    skipped = set(state) - names
    assert names <= set(state), sorted(names - set(state))[:8]
    assert skipped == {f"model.layers.{i}.engram.embed.scale" for i in cfg.engram.layer_ids}
    assert all((state[n] == 1).all() and state[n].shape[1] == math.ceil(cfg.engram.head_dim / 32) for n in skipped)
    variables = table.to_variables(state, v41.FAMILY, cfg, "hf_text")
    shapes = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), abstract_variables(cfg))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == shapes
    assert converter(v41.config_from_json(hf)) is v41.FAMILY


# ----------------------------------------------------------------------------------------------
# (e) `convert export --quant fp8` (or `release`) writes the release's storage


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """tiny_v41 with vocab 256 as a converted checkpoint (random weights) -> export --quant fp8 (default layout,
    tables in chunks of 1000 rows) -> import -> export --quant release."""
    from deepseek_jax.config import to_yaml
    from deepseek_jax.convert import exporter, importer
    from deepseek_jax.convert.orbax_writer import write_tree

    cfg = dataclasses.replace(_cfg("tiny_v41"), vocab_size=256)
    tmp, quiet, rng = tmp_path_factory.mktemp("released"), dict(log=lambda _: None), np.random.default_rng(1)
    with pytest.MonkeyPatch.context() as mp:
        cached = functools.cache(abstract_variables)  # the model's eval_shape (seconds) once per config
        mp.setattr(importer, "abstract_variables", cached)
        mp.setattr(exporter, "abstract_variables", cached)
        abstract = cached(cfg)
        variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
        for j, layer in enumerate(cfg.engram.layer_ids):  # padding rows zero, as the model initialises them
            variables["params"][f"layers_{layer}"]["block_0"]["engram"]["table"][:, cfg.engram.num_embeddings[j]:] = 0
        ours = tmp / "ours"  # what `convert import` writes (params/ + config.yaml), written directly
        write_tree(ours / importer.PARAMS_DIR, variables)
        (ours / importer.CONFIG_FILE).write_text(to_yaml(importer.run_config(cfg, ours, None)))
        mp.setattr(exporter, "ROW_CHUNK_BYTES", 1000 * 4 * cfg.engram.head_dim)  # 8214 rows: 9 chunks
        fp8 = export_checkpoint(ours, tmp / "fp8", quant="fp8", max_shard_bytes=400_000, **quiet)
        back = import_checkpoint(fp8, tmp / "back", **quiet)
        again = export_checkpoint(back, tmp / "again", quant="release", max_shard_bytes=400_000, **quiet)
    return cfg, abstract, table.from_variables(variables, v41.FAMILY, cfg, "official"), fp8, back, again


@pytest.mark.slow  # the inner loop keeps the in-memory round trips
def test_release_export_stores_every_tensor_as_released(released):
    """Every file tensor's dtype and shape is the inventory rule's (`release_specs`), and its bytes are
    `quantize_as_released` of the whole tensor: the tables, written in row chunks, without padding rows."""
    cfg, abstract, state, fp8, _, _ = released
    with SafetensorsDir(fp8) as sd:
        got = {n: (sd.info(n).dtype, sd.info(n).shape) for n in sd.names()}
    ents = table.entries(v41.FAMILY, cfg)
    want = {n: (d, s) for e in ents
            for n, d, s in v41.release_specs(e.name("official"), expected_shape(e, abstract, cfg))}
    assert got == want
    D, F, H, Q = cfg.dim, cfg.moe.moe_inter_dim, cfg.engram.head_dim, cfg.v4.q_lora_rank
    NH, rows, e = cfg.v4.n_heads * cfg.v4.head_dim, cfg.engram.num_embeddings[0], "layers.3.ffn.experts.5"
    sample = {
        "layers.0.attn.wq_b.weight": ("F8_E4M3", (NH, Q)),
        "layers.0.attn.wq_b.scale": ("F8_E8M0", (math.ceil(NH / 32), math.ceil(Q / 32))),
        f"{e}.w1.weight": ("I8", (F, D // 2)), f"{e}.w1.scale": ("F8_E8M0", (F, D // 32)),
        f"{e}.w2.weight": ("I8", (D, F // 2)), f"{e}.w2.scale": ("F8_E8M0", (D, F // 32)),
        "layers.1.engram.embed.weight": ("F8_E4M3", (rows, H)),
        "layers.1.engram.embed.scale": ("F8_E8M0", (rows, H // 32)),
        "layers.0.attn_norm.weight": ("BF16", (D,)), "embed.weight": ("BF16", (256, D)),
    }  # fmt: skip
    assert {n: got[n] for n in sample} == sample
    assert got["layers.0.hc_attn_fn"][0] == got["layers.8.ffn.gate.bias_vl"][0] == "F32"
    assert got["layers.2.attn.compressor.wkv.weight"][0] == got["layers.2.attn.indexer.wk.weight"][0] == "BF16"
    files = read_safetensors_dir(fp8)
    for n, w in state.items():
        for k, a in v41.quantize_as_released(n, w).items():
            assert files[k].tobytes() == a.tobytes(), k
    hf = json.loads((fp8 / "config.json").read_text())
    assert hf["quantization_config"] == FLASH_CONFIG["quantization_config"]
    assert _like(v41.config_from_json(hf), cfg) == cfg


@pytest.mark.slow  # the inner loop keeps the in-memory round trips
def test_release_export_imports_exactly_and_reexports_the_same_bytes(released):
    """Importing the export gives exactly its dequantised values; exporting that import (`--quant release`)
    writes byte-identical files."""
    cfg, abstract, state, fp8, back, again = released
    stored = read_safetensors_dir(fp8)
    want = {}
    for n in state:
        kind, scale = v41.stored_as(n), n.removesuffix(".weight") + ".scale"
        want[n] = (dequant(n, stored[n], stored[scale], config_block=(32, 32), fp4=kind == "fp4")
                   if kind in ("fp4", "fp8", "table") else stored[n].astype(np.float32))
    assert_trees_equal(restore_tree(back / "params", abstract), table.to_variables(want, v41.FAMILY, cfg, "official"))
    names = sorted(p.name for p in fp8.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and len(names) > 3  # shards, index, config.json
    for name in names:
        assert (fp8 / name).read_bytes() == (again / name).read_bytes(), name


def test_export_layouts_and_options(released):
    """V4.1 writes official (default) and hf_text; `hf` is refused saying why; families without a release hook
    keep their defaults and refuse `--quant release`; the CLI offers the options."""
    from deepseek_jax.cli import _parser
    from deepseek_jax.convert import exporter, v4

    _, _, _, _, back, _ = released
    with pytest.raises(ConversionError, match=r"--layout 'hf': DeepSeek-V4.1 reads but does not write it \(.*not "
                                              r"confirmed.*\); it writes \['official', 'hf_text'\]"):
        export_checkpoint(back, back.parent / "hf", layout="hf", quant="fp8", log=lambda _: None)
    with pytest.raises(ConversionError, match=r"--quant must be none\|fp8\|release"):
        export_checkpoint(back, back.parent / "fp4", quant="fp4", log=lambda _: None)
    assert not (back.parent / "hf").exists()
    assert exporter._check_options(v4.FAMILY, None, "fp8", "float32") == ("hf", None)
    with pytest.raises(ConversionError, match=r"--quant release: DeepSeek-V4 has no release-format export"):
        exporter._check_options(v4.FAMILY, None, "release", "float32")
    ns = _parser().parse_intermixed_args(["convert", "export", "a", "b", "--layout", "hf_text", "--quant", "release"])
    assert (ns.layout, ns.quant) == ("hf_text", "release")
    assert _parser().parse_intermixed_args(["convert", "export", "a", "b"]).layout is None  # the family's first
