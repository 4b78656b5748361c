"""The V4.1 image processor (deepseek_jax/media/image.py): the resize plan's test vectors
(deepseek_v41_architecture.md §3.1), pad geometry, values, RGB conversion, and an independent statement
of the fit + patch layout (PIL `ImageOps.pad` + per-patch loops in float64) on bundled sample images.
Exact equality with transformers' processor is tests/media/test_processor_parity.py's job."""

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepseek_jax.config.media import VisionConfig
from deepseek_jax.media import IMAGE, IMAGE_END, IMAGE_START, NEWLINE, TEXT
from deepseek_jax.media.image import (
    contain_size,
    expand_image_tokens,
    load_image,
    plan_image_grid,
    preprocess_image,
    unshuffle_index,
)
from deepseek_jax.tokenizer import DataError

RELEASED = VisionConfig()  # V4.1-Flash: patch 14, ratio 3, min_pixels 544², 1024 tokens
TINY = VisionConfig(hidden_size=32, num_heads=2, intermediate_size=32, num_layers=2, patch_size=2,
                    downsample_ratio=3, min_pixels=64, max_image_tokens=32, image_token_id=250)

# §3.1 test vectors: W×H -> patch grid (h, w), LLM grid (h, w), tokens
VECTORS = [
    ((544, 544), (39, 39), (13, 13), 184),
    ((224, 224), (39, 39), (13, 13), 184),
    ((640, 480), (35, 46), (12, 16), 206),
    ((1920, 1080), (69, 122), (23, 41), 968),
    ((2000, 2000), (93, 93), (31, 31), 994),
    ((4000, 500), (33, 264), (11, 88), 981),
    ((100, 3000), (215, 8), (72, 3), 290),
]


@pytest.mark.parametrize("size, vit, llm, tokens", VECTORS, ids=lambda v: "x".join(map(str, v)) if
                         isinstance(v, tuple) else str(v))
def test_plan_matches_the_reference_table(size, vit, llm, tokens):
    n_h, n_w, best_h, best_w = plan_image_grid(*size, RELEASED)
    assert (best_h // 14, best_w // 14) == vit and best_h % 14 == 0 and best_w % 14 == 0
    assert (n_h, n_w) == llm
    assert n_h * (n_w + 1) + 2 == tokens


def test_plan_single_row_and_single_column():
    """§3.1 step 5: w* < 1 -> (511·42, 42); h* < 1 -> (42, 1021·42); both cost exactly 1024 tokens."""
    assert plan_image_grid(10, 60000, RELEASED) == (511, 1, 511 * 42, 42)
    assert plan_image_grid(60000, 10, RELEASED) == (1, 1021, 42, 1021 * 42)
    for size in [(10, 60000), (60000, 10)]:
        n_h, n_w, _, _ = plan_image_grid(*size, RELEASED)
        assert n_h * (n_w + 1) + 2 == 1024


def test_plan_upscale_truncates_with_int():
    """W·H < min_pixels: both sides × √(min/(W·H)), truncated (100×50 at 64·64: ×8.19 -> 819×409)."""
    cfg = VisionConfig(patch_size=14, min_pixels=64 * 64 * 16)
    scale = math.sqrt(64 * 64 * 16 / (100 * 50))
    w, h = int(100 * scale), int(50 * scale)
    _, _, best_h, best_w = plan_image_grid(100, 50, cfg)
    assert (best_h, best_w) == (-(-h // 14) * 14, -(-w // 14) * 14)


def test_plan_budget_overrides_and_bounds():
    for W, H in [(17, 3), (3, 17), (640, 480), (1, 1), (999, 1000), (5000, 37)]:
        for max_tokens in (4, 9, 16, 64, 300):
            n_h, n_w, best_h, best_w = plan_image_grid(W, H, RELEASED, max_tokens=max_tokens, min_pixels=1)
            assert n_h * (n_w + 1) + 2 <= max_tokens and best_h > 0 and best_w > 0
            assert (n_h, n_w) == (-(-(best_h // 14) // 3), -(-(best_w // 14) // 3))


def test_max_wh_ratio_caps_the_plan_and_stretches():
    cfg = VisionConfig(max_wh_ratio=2, max_image_tokens=1024)
    assert plan_image_grid(4000, 500, cfg) == plan_image_grid(1000, 500, RELEASED)
    image = Image.fromarray(np.full((50, 400, 3), 200, np.uint8))  # 8:1, past the cap: stretched, no pad
    patches, _ = preprocess_image(image, cfg)
    assert np.all(patches == np.float32((np.float32(200 / 255) - 0.5) / 0.5))


def _half_even(diff: int) -> int:
    """round(diff / 2) with halves to even, in integers (Python's round, stated independently)."""
    q = diff // 2
    return q if diff % 2 == 0 or q % 2 == 0 else q + 1


@pytest.mark.parametrize("W, H", [(10, 4), (4, 10), (13, 7), (7, 13), (9, 9), (30, 8), (6, 21), (11, 5)])
def test_pad_geometry_and_values(W, H):
    """A white image: fitted area exactly +1.0, grey pad (127) around it, centred with round-half-even."""
    patches, (gh, gw) = preprocess_image(Image.new("RGB", (W, H), (255, 255, 255)), TINY)
    _, _, best_h, best_w = plan_image_grid(W, H, TINY)
    assert (gh * 2, gw * 2) == (best_h, best_w)
    pixels = patches.reshape(gh, gw, 3, 2, 2).transpose(0, 3, 1, 4, 2).reshape(best_h, best_w, 3)
    fit_h, fit_w = contain_size(H, W, best_h, best_w)
    assert fit_h == best_h or fit_w == best_w
    top, left = _half_even(best_h - fit_h), _half_even(best_w - fit_w)
    grey = np.float32((np.float32(127 / 255) - np.float32(0.5)) / np.float32(0.5))
    want = np.full((best_h, best_w, 3), grey, np.float32)
    want[top:top + fit_h, left:left + fit_w] = 1.0
    np.testing.assert_array_equal(pixels, want)


def _sample_images():
    skimage_data = pytest.importorskip("skimage.data")
    datasets = pytest.importorskip("sklearn.datasets")
    cbook = pytest.importorskip("matplotlib.cbook")
    return {
        "astronaut": Image.fromarray(skimage_data.astronaut()),
        "china": Image.fromarray(datasets.load_sample_image("china.jpg")),
        "grace_hopper": load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "grace_hopper"),
    }


def _reference(image: Image.Image, cfg: VisionConfig, max_tokens=None):
    """float64 statement: plan, PIL ImageOps.pad (bicubic, centred, grey), x/255, (x − 0.5)/0.5, and
    patch (i, j) = pixels[i·p:(i+1)·p, j·p:(j+1)·p] flattened (c, py, px), looped patch by patch."""
    _, _, best_h, best_w = plan_image_grid(*image.size, cfg, max_tokens=max_tokens)
    padded = ImageOps.pad(image, (best_w, best_h), method=Image.BICUBIC, color=(cfg.pad_value,) * 3)
    x = (np.asarray(padded, np.float64) / 255 - 0.5) / 0.5
    p = cfg.patch_size
    out = [x[i * p:(i + 1) * p, j * p:(j + 1) * p].transpose(2, 0, 1).reshape(-1)
           for i in range(best_h // p) for j in range(best_w // p)]
    return np.stack(out), (best_h // p, best_w // p)


@pytest.mark.parametrize("cfg, max_tokens", [(RELEASED, None), (RELEASED, 100), (TINY, None)],
                         ids=["released", "released_100_tokens", "tiny"])
def test_matches_an_independent_statement_on_sample_images(cfg, max_tokens):
    for name, image in _sample_images().items():
        got, grid = preprocess_image(image, cfg, max_tokens=max_tokens)
        want, want_grid = _reference(image, cfg, max_tokens)
        assert grid == want_grid and got.dtype == np.float32, name
        # float32 rounding of x/255 and of the normalisation: |error| <= 2 ulp(1)
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-7, err_msg=name)
        assert got.min() >= -1 and got.max() <= 1
        again, _ = preprocess_image(image, cfg, max_tokens=max_tokens)
        assert np.array_equal(got, again)  # deterministic


def test_rgb_conversion():
    grey = Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 251)
    patches, _ = preprocess_image(grey, TINY)
    c = patches.reshape(len(patches), 3, -1)
    assert np.array_equal(c[:, 0], c[:, 1]) and np.array_equal(c[:, 0], c[:, 2])
    np.testing.assert_array_equal(patches, preprocess_image(grey.convert("RGB"), TINY)[0])
    np.testing.assert_array_equal(patches, preprocess_image(np.asarray(grey), TINY)[0])  # uint8 [H, W]
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: a PIL RGBA input is composited onto white
    white = preprocess_image(Image.new("RGB", (16, 16), (255, 255, 255)), TINY)[0]
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(rgba, "RGBA"), TINY)[0], white)
    np.testing.assert_array_equal(preprocess_image(rgba, TINY)[0], white)  # uint8 [H, W, 4] the same way


def test_load_image_drops_alpha_and_applies_exif(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png", "rec")  # transformers' load_image: convert("RGB") drops alpha
    assert loaded.mode == "RGB" and np.all(np.asarray(loaded)[..., 0] == 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (30, 10), (10, 20, 30)).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue(), "rec").size == (10, 30)


def test_load_image_errors_name_the_record(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "text.png").write_text("hello")
    for source, what in [(tmp_path / "missing.png", "does not exist"), (tmp_path / "bad.png", "cannot decode"),
                         (tmp_path / "text.png", "cannot decode"), (b"garbage", "cannot decode")]:
        with pytest.raises(DataError, match=f"train.jsonl:17 segment 1.*{what}"):
            load_image(source, "train.jsonl:17 segment 1")


@pytest.mark.parametrize("h, w", [(2, 5), (4, 7), (7, 2), (3, 6), (3, 3), (1, 1)])
def test_unshuffle_index_windows(h, w):
    r = 3
    got = unshuffle_index(h, w, r)
    gh, gw = -(-h // r), -(-w // r)
    assert got.shape == (gh * gw, r * r) and got.dtype == np.int32
    for m in range(gh * gw):
        i, j = divmod(m, gw)
        for ky in range(r):
            for kx in range(r):
                y, x = i * r + ky, j * r + kx
                assert got[m, ky * r + kx] == (y * w + x if y < h and x < w else -1)
    assert sorted(got[got >= 0].tolist()) == list(range(h * w))  # every patch in exactly one window


def test_expand_image_tokens():
    img = TINY.image_token_id
    ids = [5, img, 6, 7, img, 8]
    grids = [(6, 8), [1, 3, 3]]  # a processor grid and an HF image_grid_thw row
    got_ids, slots = expand_image_tokens(ids, grids, TINY)
    span1 = [IMAGE_START] + ([IMAGE] * 3 + [NEWLINE]) * 2 + [IMAGE_END]  # 6×8 patches -> 2×3 LLM grid
    span2 = [IMAGE_START, IMAGE, NEWLINE, IMAGE_END]  # 3×3 -> 1×1
    assert slots.tolist() == [TEXT] + span1 + [TEXT, TEXT] + span2 + [TEXT]
    assert got_ids.tolist() == [5] + [img] * len(span1) + [6, 7] + [img] * len(span2) + [8]
    assert got_ids.dtype == np.int32 and slots.dtype == np.int32
    with pytest.raises(DataError, match="2 image placeholders .* but 1 image grids"):
        expand_image_tokens(ids, grids[:1], TINY)
    assert expand_image_tokens([1, 2], [], TINY)[1].tolist() == [TEXT, TEXT]
