"""Audio on the host (numpy + stdlib `wave`): WAV decoding and the Whisper-style log-mel front-end
(this project's extension; the model side is layers/audio.py).

  load_wav  PCM 8 (unsigned) / 16 / 24 / 32-bit, any channel count (mean over channels), scaled to
            [−1, 1); a file at another rate is resampled with a Hann-windowed sinc low-pass
            interpolator (`resample`: band-limited to the lower Nyquist, 32 zero crossings; scipy is not
            a dependency, and linear interpolation would alias a 44.1 kHz source into the 0–8 kHz band)
  log_mel   centred STFT (the clip reflect-padded by n_fft//2 each side, so F = 1 + len // hop frames),
            periodic Hann window of n_fft, power |X|², Slaney mel filterbank with Slaney area
            normalisation (librosa's default, which Whisper's filters are), log10(max(mel, 1e-10)),
            clamped at (its maximum − 8), then (x + 4)/4 — Whisper's `log_mel_spectrogram` except that
            Whisper drops the last STFT frame and we keep it. Computed in float64, returned float32.

Local letters: F frames, K frequency bins (n_fft//2 + 1), N mel bands.
"""

import io
import math
import wave
from pathlib import Path

import numpy as np

from deepseek_jax.config.media import AudioConfig
from deepseek_jax.media.image import open_media
from deepseek_jax.tokenizer import DataError

_ZERO_CROSSINGS = 32  # sinc half-width of the resampler, in zero crossings of the output's band limit


def _pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM -> float64 [samples, channels] in [−1, 1)."""
    if width == 1:  # 8-bit WAV is unsigned, centred at 128
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2") / 2.0**15
    elif width == 3:  # no numpy int24: assemble three bytes, sign-extend by shifting through int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8) / 2.0**23
    elif width == 4:
        x = np.frombuffer(raw, "<i4") / 2.0**31
    else:
        raise DataError(f"{8 * width}-bit samples")
    return x.reshape(-1, channels)


def load_wav(source: str | Path | bytes, name: str, sample_rate: int) -> np.ndarray:
    """A WAV file (path or bytes) -> float32 mono [samples] at `sample_rate` (stereo: channel mean).
    Raises DataError naming `name` for a missing, corrupt or unsupported file (float / extensible WAV)."""
    what, fp = open_media(source, name, "audio")
    try:
        with wave.open(fp if isinstance(fp, io.BytesIO) else str(fp), "rb") as w:  # wave opens str, not Path
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
        x = _pcm_to_float(raw[: len(raw) // (width * channels) * width * channels], width, channels)
    except (wave.Error, EOFError, DataError, ValueError) as e:
        raise DataError(f"{name}: cannot decode {what} (PCM 8/16/24/32-bit WAV expected): {e}") from None
    if x.shape[0] == 0:
        raise DataError(f"{name}: {what} holds no samples")
    return resample(x.mean(axis=1), rate, sample_rate).astype(np.float32)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling: y[k] = Σ_n x[n]·c·sinc(c·(t_k − n))·hann(t_k − n), t_k = k·rate_in/rate_out,
    c = min(1, rate_out/rate_in) (the low-pass cut at the lower Nyquist), the Hann window spanning
    ±_ZERO_CROSSINGS/c input samples; zeros outside the clip. len(y) = ⌈len(x)·rate_out/rate_in⌉.
    Polyphase: t_k's fraction takes at most L = rate_out/gcd values, so the kernel is tabulated once."""
    x = np.asarray(x, np.float64)
    if rate_in == rate_out:
        return x
    c = min(1.0, rate_out / rate_in)
    half = int(np.ceil(_ZERO_CROSSINGS / c))  # taps each side, in input samples
    g = math.gcd(rate_in, rate_out)
    L, M = rate_out // g, rate_in // g
    k = np.arange(-(-len(x) * L // M), dtype=np.int64)
    base, phase = np.divmod(k * M, L)  # t_k = base + phase / L, exactly
    phases, which = np.unique(phase, return_inverse=True)
    d_PT = (phases / L)[:, None] - np.arange(-half, half + 2)[None, :]  # t_k − n for n = base − half …
    kernel_PT = c * np.sinc(c * d_PT) * np.where(np.abs(d_PT) < half, 0.5 + 0.5 * np.cos(np.pi * d_PT / half), 0)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, (half, half + 2)), 2 * half + 2)
    out = np.empty(len(k))
    for lo in range(0, len(k), 8192):  # chunks keep the gathered [chunk, taps] windows small
        hi = min(lo + 8192, len(k))
        out[lo:hi] = np.einsum("KT,KT->K", windows[base[lo:hi]], kernel_PT[which[lo:hi]])
    return out


def hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above (27 mel per ×6.4)."""
    f = np.asarray(f, np.float64)
    return np.where(f < 1000.0, f * 3 / 200, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27 / np.log(6.4))


def mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m < 15.0, m * 200 / 3, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27))


def mel_filters(cfg: AudioConfig) -> np.ndarray:
    """[N, K] float64 Slaney filterbank: triangles between n_mels + 2 mel-spaced edges on [fmin, fmax],
    each scaled by 2/(right edge − left edge) in Hz (equal area; librosa norm="slaney")."""
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(cfg.fmin), hz_to_mel(cfg.fmax), cfg.n_mels + 2))
    bins_hz = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    rising = (bins_hz[None, :] - edges_hz[:-2, None]) / (edges_hz[1:-1] - edges_hz[:-2])[:, None]
    falling = (edges_hz[2:, None] - bins_hz[None, :]) / (edges_hz[2:] - edges_hz[1:-1])[:, None]
    weights_NK = np.maximum(0.0, np.minimum(rising, falling))
    return weights_NK * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]


def stft_power(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """[F, K] float64 |STFT|² with a periodic Hann window, frames centred on t·hop (reflect padding)."""
    x = np.asarray(x, np.float64)
    left = n_fft // 2  # numpy reflects repeatedly where the clip is shorter than the pad (torch refuses)
    padded = np.pad(x, (left, n_fft - left), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][: 1 + len(x) // hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann (torch default)
    spectrum_FK = np.fft.rfft(frames * window, axis=-1)
    return spectrum_FK.real**2 + spectrum_FK.imag**2


def log_mel(wave_: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Mono samples at cfg.sample_rate -> [F, n_mels] float32, F = 1 + len // hop (module docstring)."""
    wave_ = np.asarray(wave_)
    if wave_.ndim != 1 or len(wave_) == 0:
        raise DataError(f"log_mel needs a non-empty mono clip, got shape {wave_.shape}")
    mel_FN = stft_power(wave_, cfg.n_fft, cfg.hop_length) @ mel_filters(cfg).T
    log_FN = np.log10(np.maximum(mel_FN, 1e-10))
    log_FN = np.maximum(log_FN, log_FN.max() - 8.0)
    return ((log_FN + 4.0) / 4.0).astype(np.float32)
