"""Video on the host (Pillow): frames sampled from a GIF or a list of frame images, each run through
the V4.1 image processor like a picture (this project's extension; slots.py has the span layout).

Sampling. A GIF's frame i is shown from t_i = Σ_{k<i} d_k to t_i + d_i (d = its `duration` in ms; a
missing or zero duration counts as 100 ms, what browsers show). Samples are taken at s_j = j/fps for
every s_j < Σ d, each the frame on screen at s_j; a list of frame files is taken whole. When more than
video.max_frames remain, max_frames of them evenly spaced are kept (indices round(linspace(0, n−1, m)),
first and last included).

Grid. All frames of one clip share one token grid, planned from the first frame's size with the frame
budget: max_tokens = video.frame_max_tokens, min_pixels = video.frame_min_pixels or 1 (0 = never
upscale). Cost of a clip of n frames: 2 + n·(1 + h·(w + 1)) positions, i.e. `video_tokens_per_second`
= fps·(1 + h·(w + 1)) per second of GIF, plus 2 per clip.
"""


import numpy as np
from PIL import Image, ImageSequence

from deepseek_jax.config.media import VideoConfig, VisionConfig
from deepseek_jax.media.image import (
    _DECODE_ERRORS,
    load_image,
    open_media,
    plan_image_grid,
    preprocess_box,
    to_rgb,
)
from deepseek_jax.media.slots import video_span_len
from deepseek_jax.tokenizer import DataError

DEFAULT_FRAME_MS = 100  # a GIF frame without a duration (or with 0) is shown this long


def _even(n: int, m: int) -> np.ndarray:
    """Indices of min(n, m) of n items, evenly spaced with the first and last included."""
    if n <= m:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, m)).astype(np.int64)


def sample_times(durations_ms, fps: float, max_frames: int) -> np.ndarray:
    """Frame index shown at each sample time j/fps (j = 0, 1, … while inside the clip), then at most
    `max_frames` of them evenly spaced."""
    d = np.asarray([DEFAULT_FRAME_MS if not ms or ms <= 0 else ms for ms in durations_ms], np.float64)
    starts = np.concatenate([[0.0], np.cumsum(d)[:-1]])
    n_samples = int(np.ceil(d.sum() / 1000 * fps - 1e-9))  # s_j < total (float slack for exact ends)
    s_ms = np.arange(max(n_samples, 1)) * (1000 / fps)
    shown = np.searchsorted(starts, s_ms, side="right") - 1
    return shown[_even(len(shown), max_frames)]


def _gif_frames(source, name: str) -> tuple[list[Image.Image], list[int]]:
    """Every frame of a GIF (RGB, as Pillow composes it) and its duration in ms."""
    what, fp = open_media(source, name, "video")
    frames, durations, fmt = [], [], None
    try:
        with Image.open(fp) as im:
            fmt = im.format
            for frame in ImageSequence.Iterator(im) if fmt == "GIF" else ():
                frames.append(to_rgb(frame))  # a copy, converted like an image (alpha onto white)
                durations.append(frame.info.get("duration", 0))
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: cannot decode {what}: {type(e).__name__}: {e}") from None
    if fmt != "GIF":
        raise DataError(f"{name}: {what} is {fmt}, not a GIF (give a GIF or a list of frame files)")
    return frames, durations


def load_video(source, name: str, cfg_video: VideoConfig) -> list[Image.Image]:
    """The sampled frames of a clip: `source` is a GIF (path or bytes) or a list of frame image paths.
    Raises DataError naming `name` for missing, corrupt or unsupported input."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError(f"{name}: a video frame list must not be empty")
        keep = _even(len(source), cfg_video.max_frames)
        return [load_image(source[i], f"{name} frame {i}") for i in keep]
    frames, durations = _gif_frames(source, name)
    if not frames:
        raise DataError(f"{name}: the GIF has no frames")
    return [frames[i] for i in sample_times(durations, cfg_video.fps, cfg_video.max_frames)]


def plan_video_grid(width: int, height: int, cfg_video: VideoConfig, cfg_vision: VisionConfig):
    """(n_llm_h, n_llm_w, best_h, best_w) of every frame of a clip whose first frame is W×H."""
    return plan_image_grid(width, height, cfg_vision, max_tokens=cfg_video.frame_max_tokens,
                           min_pixels=cfg_video.frame_min_pixels or 1)


def preprocess_video(
    frames: list[Image.Image], cfg_video: VideoConfig, cfg_vision: VisionConfig
) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Frames -> one (patches [n_vit_h·n_vit_w, 3p²] float32, (n_vit_h, n_vit_w)) per frame, all in the
    box planned from the first frame (a later frame of another size is aspect-fit into it)."""
    if not frames:
        raise DataError("a video needs at least one frame")
    _, _, best_h, best_w = plan_video_grid(*frames[0].size, cfg_video, cfg_vision)
    return [preprocess_box(f, best_h, best_w, cfg_vision) for f in frames]


def video_tokens_per_second(cfg_video: VideoConfig, n_llm_h: int, n_llm_w: int) -> float:
    """Positions per second of GIF video at this frame grid: fps·(1 + h·(w + 1)) (+2 per clip), i.e.
    fps × one frame's share of `video_span_len`."""
    return cfg_video.fps * (video_span_len(1, n_llm_h, n_llm_w) - 2)
