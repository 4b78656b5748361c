"""DeepSeek-V4.1's vision tower, aligner and image delimiters in the checkpoint family (convert/v41.py) and
config.json's `vision_config` (convert/config_json.py).

- Full size: the released `vision_config` (composite config.json, or the `vision_*` keys of
  inference/config.json) is VisionConfig's defaults; the official names and shapes are those of
  shared/reference/deepseek_v41_architecture.md §4.2 (266 tensors: patch embed 2, 32 blocks × 8, final norm,
  aligner 4, delimiters 3) with §4.4's parameter counts, all stored BF16 by the release.
- Tiny (tests/golden/v41_vision/config.json: the V4.1 text fixture + a 2-layer ViT): every layout
  round-trips exactly in memory and through `convert import` / `convert export` files; the fixture's
  hf_text weights map name for name.
- Errors name the field or tensor: unknown / bad vision_config keys, a missing or mis-shaped vision tensor,
  export of what a V4.1 config.json cannot hold (aligner_hidden, pad_value, video, audio).
"""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from deepseek_jax.config import AudioConfig, VideoConfig, VisionConfig
from deepseek_jax.convert import table, v41
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.exporter import export_checkpoint
from deepseek_jax.convert.importer import expected_shape, import_checkpoint
from deepseek_jax.convert.orbax_writer import restore_tree
from deepseek_jax.convert.safetensors import SafetensorsDir
from deepseek_jax.layers.vision import Aligner, VisionTower
from tests.utils import ROOT, random_variables, write_checkpoint

FIXTURE = ROOT / "tests" / "golden" / "v41_vision"
FLASH_VISION = {"model_type": "deepseek_v41_vision", "num_hidden_layers": 32, "hidden_size": 1024}
TINY_JSON = json.loads((FIXTURE / "config.json").read_text())


def _media_leaves(ents):
    return [e for e in ents if e.leaves[0][1] == "media"]


# ----------------------------------------------------------------------------------------------
# config.json


def test_released_vision_config_is_the_default():
    from tests.convert.test_v41 import FLASH_CONFIG, FLASH_INFERENCE

    assert FLASH_CONFIG["vision_config"] == FLASH_VISION  # transformers' class defaults fill the rest
    for hf in (FLASH_CONFIG, FLASH_INFERENCE):
        assert v41.config_from_json(hf).vision == VisionConfig()
    assert v41.config_from_json(FLASH_CONFIG["text_config"]).vision is None  # a bare text config
    assert v41.config_from_json({k: v for k, v in FLASH_CONFIG.items() if k != "vision_config"}).vision is None


def test_tiny_vision_config_both_ways():
    cfg = v41.config_from_json(TINY_JSON)
    assert cfg.vision == VisionConfig(image_token_id=249, hidden_size=32, num_heads=2, intermediate_size=32,
                                      num_layers=2, patch_size=2, downsample_ratio=3, min_pixels=64,
                                      max_image_tokens=32)
    for vision in (cfg.vision, dataclasses.replace(cfg.vision, max_wh_ratio=2, norm_eps=1e-5, rope_theta=500.0)):
        c = dataclasses.replace(cfg, vision=vision)
        hf = json.loads(json.dumps(v41.config_to_json(c)))
        assert hf["image_token_id"] == 249 and hf["vision_config"]["model_type"] == "deepseek_v41_vision"
        assert v41.config_from_json(hf).vision == vision
    assert v41.config_from_json(TINY_JSON, vision=None).vision is None  # a text-only load of a VL checkpoint


@pytest.mark.parametrize("change,match", [
    ({"vision_config": {**FLASH_VISION, "spatial_merge_size": 2}}, r"vision_config: fields \['spatial_merge_size'\]"),
    ({"vision_config": {**FLASH_VISION, "model_type": "qwen2_vl"}}, r"model_type = 'qwen2_vl'"),
    ({"vision_config": {**FLASH_VISION, "num_attention_heads": 5}}, r"vision_config: .*multiple of num_heads"),
    ({"vision_config": {**FLASH_VISION, "max_wh_ratio": 2.5}}, r"vision_config: max_wh_ratio = 2.5"),
    ({"image_token_id": 200000}, r"image_token_id \(200000\) must be < vocab_size"),
])  # fmt: skip
def test_bad_vision_config_names_the_field(change, match):
    from tests.convert.test_v41 import FLASH_CONFIG

    with pytest.raises(Exception, match=match):
        v41.config_from_json({**FLASH_CONFIG, **change})


def test_bad_flat_vision_key_names_it():
    from tests.convert.test_v41 import FLASH_INFERENCE

    with pytest.raises(ConversionError, match=r"vision_spatial_merge"):
        v41.config_from_json({**FLASH_INFERENCE, "vision_spatial_merge": 2})


def test_export_refuses_what_config_json_cannot_hold():
    cfg = v41.config_from_json(TINY_JSON)
    for bad, field in ((dataclasses.replace(cfg.vision, aligner_hidden=16), "vision.aligner_hidden"),
                       (dataclasses.replace(cfg.vision, pad_value=0), "vision.pad_value")):
        with pytest.raises(ConversionError, match=field):
            v41.config_to_json(dataclasses.replace(cfg, vision=bad))
    for extra, field in (({"video": VideoConfig(video_token_id=248)}, "model.video"),
                         ({"audio": AudioConfig(audio_token_id=247)}, "model.audio")):
        with pytest.raises(ConversionError, match=field):
            v41.config_to_json(dataclasses.replace(cfg, **extra))


# ----------------------------------------------------------------------------------------------
# full size: names, shapes, storage


def test_full_size_names_shapes_and_counts():
    """The released tower's 266 tensors: §4.2 names and shapes, §4.4 counts, BF16 in the release."""
    from tests.convert.test_v41 import FLASH_CONFIG

    cfg = v41.config_from_json(FLASH_CONFIG, num_nextn_predict_layers=0)
    vc, D, key = cfg.vision, cfg.dim, jax.random.key(0)
    f32 = jax.ShapeDtypeStruct
    tower = jax.eval_shape(VisionTower(vc).init, key, f32((1, 1, vc.patch_dim), jnp.float32),
                           f32((1, 1, 2), jnp.int32), f32((1, 1), jnp.int32))
    aligner = jax.eval_shape(Aligner(vc, D).init, key, f32((1, 1, vc.hidden_size), jnp.float32),
                             f32((1, 1, 9), jnp.int32))
    media = {"vision": tower["params"], "aligner": aligner["params"],
             **{n: f32((D,), jnp.float32) for n in ("image_start", "image_newline", "image_end")}}
    abstract = nn.unbox({"params": {"media": media}})
    ents = _media_leaves(table.entries(v41.FAMILY, cfg))
    shapes = {e.name("official"): expected_shape(e, abstract, cfg) for e in ents}
    assert len(shapes) == 2 + 32 * 8 + 1 + 4 + 3 == 266
    want = {
        "vision.patch_embed.proj.weight": (1024, 588), "vision.patch_embed.proj.bias": (1024,),
        "vision.blocks.31.norm1.weight": (1024,), "vision.blocks.0.norm2.weight": (1024,),
        "vision.blocks.7.attn.wqkv.weight": (3072, 1024), "vision.blocks.7.attn.wqkv.bias": (3072,),
        "vision.blocks.7.attn.wo.weight": (1024, 1024), "vision.blocks.7.attn.wo.bias": (1024,),
        "vision.blocks.31.mlp.w1.weight": (5632, 1024), "vision.blocks.31.mlp.w2.weight": (1024, 2816),
        "vision.norm.weight": (1024,), "aligner.w1.weight": (5120, 9216), "aligner.w1.bias": (5120,),
        "aligner.w2.weight": (5120, 5120), "aligner.w2.bias": (5120,), "image_start": (5120,),
        "image_end": (5120,), "image_newline": (5120,),
    }  # fmt: skip
    assert {n: shapes[n] for n in want} == want
    count = {part: sum(math.prod(s) for n, s in shapes.items() if n.startswith(part))
             for part in ("vision.", "aligner.", "image_")}
    assert count == {"vision.": 411_842_560, "aligner.": 73_410_560, "image_": 15_360}
    assert {v41.stored_as(n) for n in shapes} == {"bf16"}  # never FP8 (mlp.w1 / aligner.w1 look like it)
    by_layout = {lay: {e.name(lay) for e in ents} for lay in v41.LAYOUTS}
    assert "model.vision.blocks.3.attn.wqkv.bias" in by_layout["hf_text"] and "model.image_end" in by_layout["hf_text"]
    assert {"model.visual.blocks.3.attn.qkv.weight", "model.visual.blocks.3.attn.proj.bias",
            "model.aligner.w2.weight", "model.image_newline"} <= by_layout["hf"]


# ----------------------------------------------------------------------------------------------
# tiny: both directions


@pytest.fixture(scope="module")
def tiny():
    cfg = v41.config_from_json(TINY_JSON)
    abstract, variables = random_variables(cfg)
    return cfg, abstract, variables


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def _media(tree):
    return tree["params"]["media"]


@pytest.mark.parametrize("layout", ["official", "hf_text"])
def test_tiny_round_trip_in_memory(tiny, layout):
    cfg, _, variables = tiny
    state = table.from_variables(variables, v41.FAMILY, cfg, layout)
    _assert_trees_equal(table.to_variables(state, v41.FAMILY, cfg, layout), variables)
    p = "" if layout == "official" else "model."
    m = _media(variables)
    W, Y, F = 32, 16, 32  # ViT width, head dim, MLP hidden
    # the transforms, spelled out: Linear [out, in] = ours transposed; fused parts in order; heads contiguous
    qkv = state[f"{p}vision.blocks.1.attn.wqkv.weight"]
    np.testing.assert_array_equal(qkv[W + Y:W + 2 * Y], m["vision"]["blocks"]["attn"]["w_qkv"][1][:, 1, 1].T)
    np.testing.assert_array_equal(state[f"{p}vision.blocks.0.mlp.w1.weight"][F:],
                                  m["vision"]["blocks"]["mlp"]["w_gate_up"][0][:, 1].T)
    np.testing.assert_array_equal(state[f"{p}vision.blocks.0.attn.wo.weight"][:, Y:],
                                  m["vision"]["blocks"]["attn"]["w_o"][0][1].T)
    w1 = state[f"{p}aligner.w1.weight"]  # [F, W·r²], input index c·r² + k
    np.testing.assert_array_equal(w1[:, 5 * 9 + 4], m["aligner"]["w1"][5, 4])
    np.testing.assert_array_equal(state[f"{p}image_newline"], m["image_newline"])


def test_tiny_hf_layout_reads(tiny):
    """transformers' VL names (read only, unconfirmed): visual.*, attn.qkv / attn.proj."""
    cfg, _, variables = tiny
    state = table.from_variables(variables, v41.FAMILY, cfg, "hf")
    assert "model.visual.blocks.1.attn.qkv.bias" in state and "model.aligner.w1.bias" in state
    _assert_trees_equal(_media(table.to_variables(state, v41.FAMILY, cfg, "hf")), _media(variables))


def test_fixture_weights_map_name_for_name():
    """tests/golden/v41_vision's hf_text weights (+ tests/golden/v41's text model) fill exactly our tree."""
    cfg = v41.config_from_json(TINY_JSON, num_nextn_predict_layers=0)  # transformers holds no DSpark
    state = {**load_file(ROOT / "tests" / "golden" / "v41" / "weights.safetensors"),
             **load_file(FIXTURE / "weights.safetensors")}
    variables = table.to_variables(state, v41.FAMILY, cfg, "hf_text")
    back = table.from_variables(variables, v41.FAMILY, cfg, "hf_text")
    vision = {n for n in state if n.startswith(("model.vision.", "model.aligner.", "model.image_"))}
    assert len(vision) == 26 and vision <= set(back)
    for n in vision:
        np.testing.assert_array_equal(back[n], state[n], n)


def test_missing_vision_tensor_is_named(tiny):
    cfg, _, variables = tiny
    state = table.from_variables(variables, v41.FAMILY, cfg, "official")
    del state["vision.blocks.1.mlp.w2.weight"]
    with pytest.raises(ConversionError, match=r"missing \['vision\.blocks\.1\.mlp\.w2\.weight'\]"):
        table.to_variables(state, v41.FAMILY, cfg, "official")


def test_misshaped_vision_tensor_is_named(tiny, tmp_path):
    cfg, _, variables = tiny
    state = table.from_variables(variables, v41.FAMILY, cfg, "official")
    state["aligner.w1.weight"] = state["aligner.w1.weight"][:, :256]  # 8 input features short
    with pytest.raises(ConversionError, match=r"aligner\.w1\.weight: shape \[64, 256\], the model needs \[64, 288\]"):
        import_checkpoint(write_checkpoint(tmp_path / "src", state, v41.config_to_json(cfg)), tmp_path / "ours",
                          log=lambda _: None)


@pytest.mark.slow  # file round trip through the streaming importer / exporter (~10 s)
def test_tiny_files_import_export(tiny, tmp_path):
    cfg, abstract, variables = tiny
    state = table.from_variables(variables, v41.FAMILY, cfg, "official")
    out = import_checkpoint(write_checkpoint(tmp_path / "src", state, v41.config_to_json(cfg)), tmp_path / "ours",
                            log=lambda _: None)
    _assert_trees_equal(restore_tree(out / "params", abstract), variables)
    for layout in ("official", "hf_text"):
        exported = export_checkpoint(out, tmp_path / layout, layout=layout, max_shard_bytes=400_000,
                                     log=lambda _: None)
        with SafetensorsDir(exported) as sd:
            got = {n: np.array(sd.read(n)) for n in sd.names()}
        want = table.from_variables(variables, v41.FAMILY, cfg, layout)
        assert sorted(got) == sorted(want)
        for n in (n for n in want if "vision." in n or "aligner." in n or "image_" in n):
            np.testing.assert_array_equal(got[n], want[n], n)
        assert v41.config_from_json(json.loads((exported / "config.json").read_text())).vision == cfg.vision
