"""Video frames (deepseek_jax/media/video.py): GIF sampling by timestamps at video.fps, at most
max_frames evenly spaced, frame lists, one shared grid per clip, the tokens-per-second formula, errors."""

import importlib.resources
import io

import numpy as np
import pytest
from PIL import Image, ImageSequence

from deepseek_jax.config.media import VideoConfig, VisionConfig
from deepseek_jax.media import video_span_len
from deepseek_jax.media.image import llm_grid, preprocess_image
from deepseek_jax.media.video import (
    load_video,
    plan_video_grid,
    preprocess_video,
    sample_times,
    video_tokens_per_second,
)
from deepseek_jax.tokenizer import DataError

VISION = VisionConfig(hidden_size=32, num_heads=2, intermediate_size=32, num_layers=2, patch_size=2,
                      downsample_ratio=3, min_pixels=64, max_image_tokens=32)
VIDEO = VideoConfig(video_token_id=9, fps=2.0, max_frames=16, frame_max_tokens=16)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 90, 90)]


def _skimage_gif():
    pytest.importorskip("skimage")
    return importlib.resources.files("skimage.data") / "no_time_for_that_tiny.gif"


def _gif(durations, size=(8, 6)) -> bytes:
    """Solid frames in distinct colours (so Pillow keeps every frame), with the given durations (ms)."""
    frames = [Image.new("RGB", size, COLOURS[i]) for i in range(len(durations))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=list(durations), loop=0)
    return buf.getvalue()


def _colour(frame: Image.Image):
    return tuple(int(v) for v in np.asarray(frame.convert("RGB"))[0, 0])


def test_skimage_gif_sampled_at_fps():
    """24 frames × 70 ms = 1.68 s: samples at 0, 0.5, 1.0, 1.5 s show frames 0, 7, 14, 21."""
    path = _skimage_gif()
    with Image.open(path) as im:
        assert (im.n_frames, im.size, im.info["duration"]) == (24, (14, 25), 70)
        every = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    frames = load_video(path, "rec", VIDEO)
    assert len(frames) == 4
    for got, i in zip(frames, [0, 7, 14, 21]):
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(every[i]))
    fast = load_video(path, "rec", VideoConfig(video_token_id=9, fps=100.0, max_frames=5))
    # 168 samples, 5 kept evenly spaced (first and last included): samples 0, 42, 84, 125, 167
    for got, s in zip(fast, [0, 42, 84, 125, 167]):
        assert np.array_equal(np.asarray(got), np.asarray(every[int(s * 10 // 70)]))


def test_sampling_follows_durations():
    # frames shown over [0,100) [100,400) [400,450) [450,1000): samples at 0, 250, 500, 750 ms (fps 4)
    frames = load_video(_gif([100, 300, 50, 550]), "rec", VideoConfig(video_token_id=9, fps=4.0))
    assert [_colour(f) for f in frames] == [COLOURS[0], COLOURS[1], COLOURS[3], COLOURS[3]]
    assert sample_times([100, 300, 50, 550], 4.0, 16).tolist() == [0, 1, 3, 3]
    assert sample_times([0, 0], 20.0, 16).tolist() == [0, 0, 1, 1]  # missing durations: 100 ms each
    assert sample_times([500], 2.0, 16).tolist() == [0]  # an exact end is not sampled (s < total)


def test_frame_lists_keep_every_frame_up_to_max(tmp_path):
    paths = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (5, 4), c).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert [_colour(f) for f in load_video(paths, "rec", VIDEO)] == COLOURS
    few = load_video(paths, "rec", VideoConfig(video_token_id=9, max_frames=3))
    assert [_colour(f) for f in few] == [COLOURS[0], COLOURS[3], COLOURS[6]]


def test_frames_share_the_first_frames_grid():
    frames = [Image.new("RGB", (40, 20), (200, 0, 0)), Image.new("RGB", (20, 40), (0, 200, 0))]
    pictures = preprocess_video(frames, VIDEO, VISION)
    _, _, best_h, best_w = plan_video_grid(40, 20, VIDEO, VISION)
    assert [g for _, g in pictures] == [(best_h // 2, best_w // 2)] * 2
    # the first frame equals the image processor at the frame budget; the second is fit into its box
    first, grid = preprocess_image(frames[0], VISION, max_tokens=VIDEO.frame_max_tokens, min_pixels=1)
    assert np.array_equal(pictures[0][0], first) and pictures[0][1] == grid
    n_h, n_w = llm_grid(*grid, VISION.downsample_ratio)
    assert n_h * (n_w + 1) + 2 <= VIDEO.frame_max_tokens


def test_frames_are_not_upscaled_by_default():
    """frame_min_pixels 0 -> min_pixels 1: a 14×25 frame keeps its size (rounded up to patches)."""
    roomy = VideoConfig(video_token_id=9, frame_max_tokens=64)
    assert plan_video_grid(14, 25, roomy, VISION)[2:] == (26, 14)
    upscaled = VideoConfig(video_token_id=9, frame_min_pixels=40 * 40, frame_max_tokens=64)
    assert plan_video_grid(14, 25, upscaled, VISION)[2] > 26


def test_tokens_per_second_formula():
    path = _skimage_gif()
    frames = load_video(path, "rec", VIDEO)
    pictures = preprocess_video(frames, VIDEO, VISION)
    n_h, n_w = llm_grid(*pictures[0][1], VISION.downsample_ratio)
    seconds = 2.0  # 4 samples at 2 fps cover 2 s of sampling grid (the clip is 1.68 s, rounded up)
    span = video_span_len(len(frames), n_h, n_w)
    assert span == video_tokens_per_second(VIDEO, n_h, n_w) * seconds + 2
    assert video_tokens_per_second(VIDEO, 2, 3) == 2.0 * (1 + 2 * (3 + 1))  # fps·(1 + h·(w + 1))


def test_errors_name_the_record(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "still.png")
    cases = [(tmp_path / "none.gif", "does not exist"), (b"GIF89a broken", "cannot decode"),
             (tmp_path / "still.png", "PNG, not a GIF"), ([], "must not be empty"),
             ([tmp_path / "none.png"], "frame 0: image file .* does not exist")]
    for source, what in cases:
        with pytest.raises(DataError, match=f"train.jsonl:5 segment 0.*{what}"):
            load_video(source, "train.jsonl:5 segment 0", VIDEO)


def test_decompression_bomb_gif_is_a_data_error(monkeypatch):
    """Pillow's DecompressionBombError (and ValueError) are decode errors, as for images."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8×6 GIF is past 2× the limit: a bomb
    with pytest.raises(DataError, match="rec: cannot decode video bytes: DecompressionBombError"):
        load_video(_gif([100, 100]), "rec", VIDEO)
