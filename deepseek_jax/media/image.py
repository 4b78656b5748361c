"""The V4.1 image processor on the host (numpy + Pillow), equal value for value to transformers'
`DeepseekV41ImageProcessorPil` (huggingface/transformers@a290b39f,
src/transformers/models/deepseek_v41/image_processing_pil_deepseek_v41.py; deepseek_v41_architecture.md
§3.1), and the expansion of image placeholders into spans (§3.4).

  plan     upscale below min_pixels (int truncation), round sides up to whole patches, and when the
           grid costs more than max_image_tokens take the closed-form shrink (single row / single
           column when one side would fall below one LLM token); max_wh_ratio caps W before planning
  fit      aspect-fit into the planned box with PIL `ImageOps.contain`'s rounding, Pillow bicubic on
           the uint8 RGB image (what the HF PIL backend does: uint8 in, uint8 out), centred pad with
           `pad_value` (top/left = round((box − fitted)·0.5), Python's round); a W ≥ ratio·H image is
           stretched into the box instead when max_wh_ratio is set
  values   float32(uint8 · (1/255) in float64), then (x − 0.5)/0.5 in float32: [−1, 1]
  patches  [n_vit_h·n_vit_w, 3·p²], patches row-major, each flattened channel-major (c, py, px)

RGB conversion follows HF for each kind of input: `load_image` = transformers' `load_image` (EXIF
orientation applied, `convert("RGB")`, which drops alpha); a PIL image given to `preprocess_image`
with alpha (an "A" band or a `transparency` entry) is composited onto white, as the PIL backend does;
grey becomes three equal channels. uint8 arrays [H, W] / [H, W, 3] / [H, W, 4] follow HF's array path.
"""

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from deepseek_jax.config.errors import ConfigError
from deepseek_jax.config.media import VisionConfig
from deepseek_jax.media.slots import IMAGE, IMAGE_END, IMAGE_START, NEWLINE, TEXT, image_span_len
from deepseek_jax.tokenizer import DataError

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


def _shrink(height: int, width: int, p: int, r: int, max_tokens: int) -> tuple[int, int]:
    """The largest aspect-preserving box (best_h, best_w) whose grid costs <= max_tokens: with
    h·(w+1) + 2 = max_tokens and h = w·H/W, w* = √((max − 2)/(H/W) + ¼) − ½ (HF solve_resize_ratio)."""
    ratio = height / width
    max_w = math.sqrt((max_tokens - 2) / ratio + 0.25) - 0.5
    max_h = max_w * ratio
    cell = p * r
    if max_w < 1.0:  # very tall: one LLM column, (max − 2)//2 rows
        return (max_tokens - 2) // 2 * cell, cell
    if max_h < 1.0:  # very wide: one LLM row of max − 3 tokens
        return cell, (max_tokens - 3) * cell
    beta = min(math.floor(max_w) * cell / width, math.floor(max_h) * cell / height)
    return math.floor(height * beta / p) * p, math.floor(width * beta / p) * p


def plan_image_grid(
    width: int, height: int, cfg: VisionConfig, *, max_tokens: int | None = None, min_pixels: int | None = None
) -> tuple[int, int, int, int]:
    """Resize plan of a W×H image -> (n_llm_h, n_llm_w, best_h, best_w); best_* are pixel sides (multiples
    of patch_size), n_llm = ⌈(best/p)/r⌉. `max_tokens` / `min_pixels` override the config's budget."""
    p, r = cfg.patch_size, cfg.downsample_ratio
    max_tokens = cfg.max_image_tokens if max_tokens is None else max_tokens
    min_pixels = cfg.min_pixels if min_pixels is None else min_pixels
    if min_pixels <= 0 or max_tokens < 4:
        raise ConfigError(f"image plan: min_pixels must be > 0 and max_tokens >= 4, got {min_pixels}, {max_tokens}")
    if width <= 0 or height <= 0:
        raise DataError(f"image size must be positive, got {width}×{height}")
    if cfg.max_wh_ratio and width > height * cfg.max_wh_ratio:
        width = height * cfg.max_wh_ratio
    if width * height < min_pixels:
        scale = (min_pixels / (width * height)) ** 0.5  # `** 0.5` as HF (not sqrt): same float bits
        width, height = int(width * scale), int(height * scale)
    best_w, best_h = math.ceil(width / p) * p, math.ceil(height / p) * p
    n_h, n_w = llm_grid(best_h // p, best_w // p, r)
    if image_span_len(n_h, n_w) > max_tokens:
        best_h, best_w = _shrink(height, width, p, r, max_tokens)
        n_h, n_w = llm_grid(best_h // p, best_w // p, r)
        if image_span_len(n_h, n_w) > max_tokens or best_h <= 0 or best_w <= 0:
            raise DataError(f"the resize plan cannot fit a {width}×{height} image in {max_tokens} tokens")
    return n_h, n_w, best_h, best_w


def contain_size(height: int, width: int, box_h: int, box_w: int) -> tuple[int, int]:
    """(h, w) of the aspect-preserving fit inside the box, PIL `ImageOps.contain`'s rounding: the
    binding side exact, the other round()ed (Python's round: halves to even)."""
    image_ratio, box_ratio = width / height, box_w / box_h
    if image_ratio > box_ratio:
        return round(height / width * box_w), box_w
    if image_ratio < box_ratio:
        return box_h, round(width / height * box_h)
    return box_h, box_w


def _array_to_rgb(x: np.ndarray) -> Image.Image:
    """uint8 [H, W], [H, W, 1|3|4] -> RGB PIL image as HF's array path converts it (alpha composited onto
    white in float64 and rounded: np.round(a·rgb + (1 − a)·255), a = alpha/255)."""
    if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (1, 3, 4)):
        raise DataError(f"image arrays must be uint8 [H, W] or [H, W, 1|3|4], got {x.dtype} {x.shape}")
    if x.ndim == 2 or x.shape[-1] == 1:
        x = np.repeat(x.reshape(x.shape[0], x.shape[1], 1), 3, axis=-1)
    elif x.shape[-1] == 4:
        alpha = x[..., 3:4] / 255
        x = np.round(alpha * x[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(x), mode="RGB")


def to_rgb(image) -> Image.Image:
    """An RGB PIL image, converted as the HF PIL backend converts its input (see the module docstring)."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        raise DataError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_media(source: str | Path | bytes, name: str, kind: str) -> tuple[str, Path | io.BytesIO]:
    """(how to name it in errors, what Pillow opens) for a media path or its bytes; a missing file is a
    DataError naming `name`."""
    if isinstance(source, (bytes, bytearray)):
        return f"{kind} bytes", io.BytesIO(source)
    if not Path(source).is_file():
        raise DataError(f"{name}: {kind} file {source} does not exist")
    return f"{kind} {source}", Path(source)


def load_image(source: str | Path | bytes, name: str) -> Image.Image:
    """Decodes an image file (a path or its bytes) as transformers' `load_image` does: EXIF orientation
    applied, then `convert("RGB")`. Raises DataError naming `name` when missing, corrupt or unsupported."""
    what, fp = open_media(source, name, "image")
    try:
        with Image.open(fp) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: cannot decode {what}: {type(e).__name__}: {e}") from None


def fit_to_box(image: Image.Image, best_h: int, best_w: int, cfg: VisionConfig) -> np.ndarray:
    """RGB image -> uint8 [best_h, best_w, 3]: aspect-fit (bicubic) and centred grey pad, or a stretch
    into the box for images at or past max_wh_ratio (HF tests W >= ratio·H here, W > ratio·H in the plan)."""
    W, H = image.size
    if cfg.max_wh_ratio and W >= cfg.max_wh_ratio * H:
        return np.asarray(image.resize((best_w, best_h), Image.BICUBIC))
    fit_h, fit_w = contain_size(H, W, best_h, best_w)
    if fit_h <= 0 or fit_w <= 0:
        raise DataError(f"a {W}×{H} image is too elongated to fit a {best_w}×{best_h} box")
    fitted = np.asarray(image.resize((fit_w, fit_h), Image.BICUBIC))
    top, left = round((best_h - fit_h) * 0.5), round((best_w - fit_w) * 0.5)
    out = np.full((best_h, best_w, 3), cfg.pad_value, np.uint8)
    out[top:top + fit_h, left:left + fit_w] = fitted
    return out


def patchify(pixels_HWC: np.ndarray, p: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H/p · W/p, 3·p²] in [−1, 1]: row-major patches, channel-major inside."""
    H, W, C = pixels_HWC.shape
    gh, gw = H // p, W // p
    x = pixels_HWC.reshape(gh, p, gw, p, C).transpose(0, 2, 4, 1, 3).reshape(gh * gw, C * p * p)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescale: f64 product, f32 result
    half = np.float32(0.5)
    return (x - half) / half  # HF normalize: float32 arithmetic


def preprocess_box(image, best_h: int, best_w: int, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """One picture into a given planned box (video frames share the first frame's box)."""
    pixels = fit_to_box(to_rgb(image), best_h, best_w, cfg)
    p = cfg.patch_size
    return patchify(pixels, p), (best_h // p, best_w // p)


def preprocess_image(
    image, cfg: VisionConfig, *, max_tokens: int | None = None, min_pixels: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL image (or uint8 array) -> (patches float32 [n_vit_h·n_vit_w, 3p²], (n_vit_h, n_vit_w))."""
    image = to_rgb(image)
    _, _, best_h, best_w = plan_image_grid(*image.size, cfg, max_tokens=max_tokens, min_pixels=min_pixels)
    return preprocess_box(image, best_h, best_w, cfg)


def llm_grid(n_vit_h: int, n_vit_w: int, r: int) -> tuple[int, int]:
    """The aligner's token grid over a patch grid: ⌈n/r⌉ per side."""
    return -(-n_vit_h // r), -(-n_vit_w // r)


def unshuffle_index(n_vit_h: int, n_vit_w: int, r: int) -> np.ndarray:
    """[⌈h/r⌉·⌈w/r⌉, r²] int32: aligner row m (row-major over the LLM grid) = the patch indices of its
    r×r window in ky-major order (ky·r + kx); −1 where the window passes the grid's bottom/right edge."""
    gh, gw = llm_grid(n_vit_h, n_vit_w, r)
    rows = (np.arange(gh) * r)[:, None, None, None] + np.arange(r)[None, None, :, None]  # [gh, 1, r, 1]
    cols = (np.arange(gw) * r)[None, :, None, None] + np.arange(r)[None, None, None, :]  # [1, gw, 1, r]
    index = np.where((rows < n_vit_h) & (cols < n_vit_w), rows * n_vit_w + cols, -1)
    return index.reshape(gh * gw, r * r).astype(np.int32)


def image_span_slots(n_llm_h: int, n_llm_w: int) -> np.ndarray:
    """Slot codes of one image span: IMAGE_START, (IMAGE × w, NEWLINE) × h, IMAGE_END."""
    row = np.array([IMAGE] * n_llm_w + [NEWLINE], np.int32)
    return np.concatenate([[IMAGE_START], np.tile(row, n_llm_h), [IMAGE_END]]).astype(np.int32)


def _vit_grid(grid) -> tuple[int, int]:
    """(n_vit_h, n_vit_w) from a processor grid or an HF `image_grid_thw` row [1, h, w]."""
    grid = [int(g) for g in grid]
    if len(grid) == 3 and grid[0] == 1:
        grid = grid[1:]
    if len(grid) != 2 or min(grid) <= 0:
        raise DataError(f"an image grid must be (n_vit_h, n_vit_w) or (1, n_vit_h, n_vit_w), got {grid}")
    return grid[0], grid[1]


def expand_image_tokens(ids, grids, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every `image_token_id` in `ids` -> its whole span (all positions that id, as HF's processor does).
    Returns (ids int32 [n], slots int32 [n]; TEXT outside spans). `grids`: one (n_vit_h, n_vit_w) per
    placeholder, in order."""
    ids = np.asarray(ids).reshape(-1)
    at = np.flatnonzero(ids == cfg.image_token_id)
    if len(at) != len(grids):
        raise DataError(f"{len(at)} image placeholders (id {cfg.image_token_id}) but {len(grids)} image grids")
    out_ids, out_slots, start = [], [], 0
    for pos, grid in zip(at, grids):
        text = ids[start:pos]
        span = image_span_slots(*llm_grid(*_vit_grid(grid), cfg.downsample_ratio))
        out_ids += [text, np.full(len(span), cfg.image_token_id)]
        out_slots += [np.full(len(text), TEXT), span]
        start = pos + 1
    out_ids.append(ids[start:])
    out_slots.append(np.full(len(ids) - start, TEXT))
    return np.concatenate(out_ids).astype(np.int32), np.concatenate(out_slots).astype(np.int32)
