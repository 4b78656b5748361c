"""media/image.py equals transformers' own V4.1 processor (huggingface/transformers@a290b39f:
`DeepseekV41ImageProcessorPil`, `DeepseekV41Processor`) value for value, against outputs stored by
tests/golden/v41_vision/generate_fixture.py (processor.json, processor.safetensors).

Images: package samples (skimage astronaut, chelsea, coffee, camera (grey), logo (RGBA); sklearn
china.jpg; matplotlib grace_hopper.jpg) and synthetic ones (a 16×12 noise image, a 5×3 crop below
min_pixels, 512×10 / 10×512 strips that collapse to one LLM row / column, a 300×40 strip squeezed by
max_wh_ratio 2). Settings: the released ones (patch 14, 544² min pixels, 1024 tokens: grids, shapes and the
SHA-256 of the float32 patches), the tiny ones of the parity fixture (patch 2, ratio 3, 64 pixels, 32
tokens: full arrays), the max_wh_ratio squeeze, and per-call budgets (`max_tokens`, `min_pixels`, as video
frames use). Prompts: placeholders (adjacent, first, last) expanded to HF's `input_ids`, slots laid out as
the fixture's float64 statement says (vision_reference.span_slots).

Inputs are what HF was given: a PIL image as `Image.open` decodes it (RGB files also through our
`load_image`, the same pixels), or its uint8 array (camera, logo). `load_image` itself drops alpha
(transformers' `load_image` does too), so the RGBA logo goes in as the opened image, which the PIL backend
composites onto white.
"""

import dataclasses
import hashlib
import importlib.resources
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from deepseek_jax.config.media import VisionConfig
from deepseek_jax.media.image import expand_image_tokens, load_image, preprocess_image
from tests.utils import ROOT

FIXTURE = ROOT / "tests" / "golden" / "v41_vision"
META = json.loads((FIXTURE / "processor.json").read_text())
SETTINGS = {"released": VisionConfig(), "tiny": VisionConfig(patch_size=2, downsample_ratio=3, min_pixels=64,
                                                             max_image_tokens=32, image_token_id=249)}


def _reference_module():
    spec = importlib.util.spec_from_file_location("vision_reference", FIXTURE / "vision_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _path(name):
    s = META["samples"][name]
    return str(importlib.resources.files(s["package"]).joinpath(s["file"]))


@pytest.fixture(scope="module")
def arrays():
    return load_file(FIXTURE / "processor.safetensors")


def _image(name, kind, arrays):
    if name not in META["samples"]:
        return Image.fromarray(arrays[f"images.{name}"])
    opened = Image.open(_path(name))
    if kind == "array":
        return np.asarray(opened)
    return opened if opened.mode == "RGBA" else load_image(_path(name), name)


def test_samples_decode_as_in_the_fixture():
    """Same files, same decoded pixels (else a Pillow / package version differs from the fixture's)."""
    for name, s in META["samples"].items():
        assert hashlib.sha256(open(_path(name), "rb").read()).hexdigest() == s["sha256"], name
        assert hashlib.sha256(np.asarray(Image.open(_path(name))).tobytes()).hexdigest() == \
            META["decoded_sha256"][name], name


def _check(case, arrays):
    setting = case["setting"].split("_max_")[0]  # "released_max_image_tokens_…" / "tiny_max_wh_ratio_2"
    cfg, kwargs = SETTINGS[setting], dict(case["kwargs"])
    if "max_wh_ratio" in kwargs:
        cfg = dataclasses.replace(cfg, max_wh_ratio=kwargs.pop("max_wh_ratio"))
    budget = {"max_tokens": kwargs.pop("max_image_tokens", None), "min_pixels": kwargs.pop("min_pixels", None)}
    assert not kwargs, kwargs
    patches, grid = preprocess_image(_image(case["image"], case["input"], arrays), cfg, **budget)
    assert list(grid) == case["grid"] and list(patches.shape) == case["shape"] and patches.dtype == np.float32
    key = f"pixel_values.{case['key']}"
    if key in arrays:
        np.testing.assert_array_equal(patches, arrays[key])
    digest = hashlib.sha256(np.ascontiguousarray(patches).tobytes()).hexdigest()
    assert digest == case["sha256"], f"{case['key']}: patches differ (sum {patches.astype(np.float64).sum()} vs " \
                                     f"HF's {case['sum']})"


@pytest.mark.parametrize("case", [pytest.param(c, id=c["key"]) for c in META["cases"]])
def test_patches_equal_hf(case, arrays):
    _check(case, arrays)


def test_prompt_expansion_equals_hf(arrays):
    """Placeholders (two adjacent, one first, one last; two rows, one padded) -> HF's input_ids; slots as the
    float64 statement lays them out."""
    prompt, cfg, vr = META["prompt"], SETTINGS["tiny"], _reference_module()
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    want, mask = arrays["prompt.input_ids"], arrays["prompt.attention_mask"].astype(bool)
    k = 0
    for b, text in enumerate(prompt["text"]):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == prompt["unexpanded_ids"][b]
        grids = prompt["grids"][k:k + ids.count(cfg.image_token_id)]
        got, slots = expand_image_tokens(ids, grids, cfg)
        np.testing.assert_array_equal(got, want[b][mask[b]])
        np.testing.assert_array_equal(slots, vr.span_slots(got, grids, cfg.image_token_id, cfg.downsample_ratio))
        k += len(grids)
    assert k == len(prompt["grids"])
