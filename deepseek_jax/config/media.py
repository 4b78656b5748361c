"""Media front-ends fused into the token stream: V4.1's vision tower (exact), and video and audio
(this project's extension of the same early-fusion design).

Vision field names follow transformers' `DeepseekV41VisionConfig` and the official `vision_*` keys;
the processor's resize plan (min_pixels, max_image_tokens, max_wh_ratio) lives here too because it
fixes how many tokens an image costs (`deepseek_v41_architecture.md` §3). Video runs its frames
through the same tower; audio has a log-mel front-end of its own (docs/multimodal.md).
"""

from dataclasses import dataclass

from deepseek_jax.config.errors import require as _check


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """DeepSeek-ViT + the r×r pixel-unshuffle aligner (V4.1-Flash values as defaults)."""

    image_token_id: int = 129264  # `<｜deepseek_image｜>`: one per image in the text, then the whole span
    hidden_size: int = 1024  # ViT width
    num_heads: int = 16
    intermediate_size: int = 2816  # SwiGLU hidden (w1 is [2·F, W], gate rows first)
    num_layers: int = 32
    patch_size: int = 14
    downsample_ratio: int = 3  # aligner window side: r² patches -> one LLM token
    rope_theta: float = 10000.0  # 2D RoPE over (row, col), half-split
    norm_eps: float = 1e-6
    aligner_hidden: int = 0  # aligner w1 output; 0 = the LM width (as released: 5120)
    # processor (HF image_processing_*_deepseek_v41): upscale below min_pixels, shrink to fit
    # max_image_tokens LLM tokens, aspect-fit and pad with grey, normalise to [-1, 1]
    min_pixels: int = 295936  # 544²
    max_image_tokens: int = 1024
    max_wh_ratio: int = 0  # 0 = no cap (HF None)
    pad_value: int = 127

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "intermediate_size", "num_layers", "patch_size",
                     "downsample_ratio", "min_pixels", "rope_theta", "norm_eps"):
            _check(getattr(self, name) > 0, f"vision.{name} must be > 0, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        _check(self.head_dim % 4 == 0, f"vision head dim ({self.head_dim}) must be a multiple of 4 (2D RoPE "
               "rotates half-split pairs over two axes)")
        _check(self.max_image_tokens >= 4, f"vision.max_image_tokens must be >= 4, got {self.max_image_tokens}")
        _check(self.max_wh_ratio >= 0 and self.aligner_hidden >= 0 and 0 <= self.pad_value <= 255,
               "vision.max_wh_ratio and aligner_hidden must be >= 0, pad_value in [0, 255]")
        _check(self.image_token_id >= 0, f"vision.image_token_id must be >= 0, got {self.image_token_id}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: 3 channels × patch_size², flattened channel-major (c, py, px)."""
        return 3 * self.patch_size**2


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Video = frames sampled at `fps`, each through the vision tower and aligner like an image, in a
    span VIDEO_START, then per frame a learned frame-number delimiter and its token grid, VIDEO_END."""

    video_token_id: int  # placeholder id of a video in the text
    fps: float = 2.0  # frames sampled per second of source (frame lists: every frame, up to max_frames)
    max_frames: int = 16  # frames kept per clip (evenly spaced when there are more); frame delimiters
    frame_max_tokens: int = 64  # a frame's token grid is planned like an image with this budget
    frame_min_pixels: int = 0  # 0 = frames are never upscaled (a frame of video is small already)

    def __post_init__(self):
        _check(self.video_token_id >= 0, f"video.video_token_id must be >= 0, got {self.video_token_id}")
        _check(self.fps > 0 and self.max_frames > 0, "video.fps and video.max_frames must be > 0")
        _check(self.frame_max_tokens >= 4, f"video.frame_max_tokens must be >= 4, got {self.frame_max_tokens}")
        _check(self.frame_min_pixels >= 0, "video.frame_min_pixels must be >= 0")


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Audio = a log-mel spectrogram (computed in the data pipeline), a strided 1-D convolutional
    front-end and a two-layer projector into the model width, in a span AUDIO_START … AUDIO_END."""

    audio_token_id: int  # placeholder id of an audio clip in the text
    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms Hann window at 16 kHz
    hop_length: int = 160  # 10 ms
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    conv_channels: int = 256  # front-end width
    conv_strides: tuple[int, ...] = (2, 2)  # one Conv1d(k=3, pad 1) + GELU per entry; 4 -> 40 ms tokens
    max_seconds: float = 30.0  # longest clip accepted (the pipeline's per-clip frame budget)

    def __post_init__(self):
        _check(self.audio_token_id >= 0, f"audio.audio_token_id must be >= 0, got {self.audio_token_id}")
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "conv_channels"):
            _check(getattr(self, name) > 0, f"audio.{name} must be > 0, got {getattr(self, name)}")
        _check(len(self.conv_strides) >= 1 and all(s >= 1 for s in self.conv_strides),
               f"audio.conv_strides must be >= 1 each, got {self.conv_strides}")
        _check(0 <= self.fmin < self.fmax <= self.sample_rate / 2,
               f"audio: need 0 <= fmin < fmax <= sample_rate / 2, got {self.fmin}, {self.fmax}")
        _check(self.max_seconds > 0, "audio.max_seconds must be > 0")

    @property
    def max_frames(self) -> int:
        """Log-mel frames of the longest clip (centred STFT: 1 + samples // hop)."""
        return 1 + int(self.max_seconds * self.sample_rate) // self.hop_length

    def n_tokens(self, frames: int) -> int:
        """LM tokens of a clip with `frames` log-mel frames (each conv: ceil(n / stride))."""
        for s in self.conv_strides:
            frames = -(-frames // s)
        return frames
