"""Audio on the host (deepseek_jax/media/audio.py): WAV decoding of every PCM width, resampling, and the
log-mel front-end against a float64 statement written here (explicit reflect indices, a DFT matrix, a
Slaney filterbank built band by band), analytic tones, and Whisper's feature extractor."""

import struct

import numpy as np
import pytest

from deepseek_jax.config.media import AudioConfig
from deepseek_jax.media.audio import load_wav, log_mel, mel_filters, resample
from deepseek_jax.tokenizer import DataError
from tests.utils import wav_bytes

CFG = AudioConfig(audio_token_id=7)  # Whisper's: 16 kHz, n_fft 400, hop 160, 80 mels, 0–8 kHz
SMALL = AudioConfig(audio_token_id=7, sample_rate=8000, n_fft=200, hop_length=80, n_mels=32, fmin=500.0,
                    fmax=2000.0)


def _slaney_mel(f):
    return f / (200 / 3) if f < 1000 else 15 + np.log(f / 1000) / (np.log(6.4) / 27)


def _slaney_hz(m):
    return m * 200 / 3 if m < 15 else 1000 * np.exp((m - 15) * np.log(6.4) / 27)


def _reference_log_mel(x, cfg: AudioConfig):
    """float64, looped: frame t covers padded samples [t·hop, t·hop + n_fft) with the clip reflected at
    both ends (index −k -> k, len−1+k -> len−1−k); X_k = Σ_n w_n x_n e^{−2πikn/N}; Slaney triangles."""
    N, hop, L = cfg.n_fft, cfg.hop_length, len(x)
    frames = 1 + L // hop
    idx = np.arange(frames)[:, None] * hop + np.arange(N)[None, :] - N // 2
    idx = np.where(idx < 0, -idx, idx)
    idx = np.where(idx > L - 1, 2 * (L - 1) - idx, idx)
    w = np.array([0.5 - 0.5 * np.cos(2 * np.pi * n / N) for n in range(N)])
    K = N // 2 + 1
    dft = np.exp(-2j * np.pi * np.outer(np.arange(N), np.arange(K)) / N)
    power = np.abs((x[idx] * w) @ dft) ** 2
    lo, hi = _slaney_mel(cfg.fmin), _slaney_mel(cfg.fmax)
    edges = [_slaney_hz(lo + (hi - lo) * i / (cfg.n_mels + 1)) for i in range(cfg.n_mels + 2)]
    freqs = np.arange(K) * cfg.sample_rate / N
    fb = np.zeros((K, cfg.n_mels))
    for m in range(cfg.n_mels):
        a, b, c = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            tri = (f - a) / (b - a) if f <= b else (c - f) / (c - b)
            fb[k, m] = max(tri, 0.0) * 2 / (c - a)
    logm = np.log10(np.maximum(power @ fb, 1e-10))
    return (np.maximum(logm, logm.max() - 8) + 4) / 4


@pytest.mark.parametrize("cfg, n", [(CFG, 4000), (CFG, 4321), (SMALL, 2345), (SMALL, 100)],
                         ids=["whisper_even", "whisper_odd", "small", "shorter_than_a_window"])
def test_log_mel_matches_a_float64_statement(cfg, n):
    rng = np.random.default_rng(n)
    t = np.arange(n) / cfg.sample_rate
    x = 0.3 * np.sin(2 * np.pi * 900 * t) + 0.05 * rng.standard_normal(n)
    got = log_mel(x.astype(np.float32), cfg)
    want = _reference_log_mel(x.astype(np.float32).astype(np.float64), cfg)
    assert got.shape == (1 + n // cfg.hop_length, cfg.n_mels) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float64 inside, one float32 cast


def test_mel_filters_are_slaney_area_normalised():
    fine = AudioConfig(audio_token_id=7, n_fft=32000)  # 0.5 Hz bins: the sum approximates the integral
    fb = mel_filters(fine)
    freqs = np.linspace(0, 8000, 16001)
    assert np.all(np.diff(freqs[np.argmax(fb, axis=1)]) > 0) and fb.min() >= 0
    # each triangle's area in Hz = ½·(c − a)·2/(c − a) = 1 (librosa norm="slaney")
    np.testing.assert_allclose(fb.sum(axis=1) * 0.5, 1.0, rtol=1e-2)  # Riemann sum of a 0.5 Hz grid


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_a_tone_peaks_in_its_mel_band(freq):
    t = np.arange(16000) / CFG.sample_rate
    mel = log_mel(np.sin(2 * np.pi * freq * t), CFG)
    fb = mel_filters(CFG)
    band = int(np.argmax(fb[:, int(round(freq / 40))]))  # the band weighting the tone's FFT bin most
    assert np.all(np.abs(np.argmax(mel[2:-2], axis=1) - band) <= 1)
    assert mel.max() - mel.min() <= 2.0 + 1e-6  # clamp at max − 8 in log10 units, /4


def test_lengths_and_short_clips():
    for n in (1, 2, 159, 160, 161, 480):
        assert log_mel(np.ones(n, np.float32) * 0.1, CFG).shape == (1 + n // 160, 80)
    with pytest.raises(DataError, match="non-empty mono"):
        log_mel(np.zeros(0), CFG)


@pytest.mark.parity
def test_log_mel_matches_whisper_feature_extractor():
    """Whisper drops the last STFT frame; the rest must agree (the clamp's max is not in that frame)."""
    transformers = pytest.importorskip("transformers")
    x = (0.1 * np.random.default_rng(0).standard_normal(16000 * 2)).astype(np.float32)
    want = transformers.WhisperFeatureExtractor()._np_extract_fbank_features(x[None], "cpu")[0].T
    got = log_mel(x, CFG)
    assert got[:-1].shape == want.shape
    np.testing.assert_allclose(got[:-1], want, rtol=1e-5, atol=1e-5)


def test_load_wav_every_pcm_width(tmp_path):
    v = [0.0, 0.5, -0.5, 0.25, -1.0, 0.75]
    enc = {
        1: bytes(int(128 + s * 128) if s < 1 else 255 for s in v),
        2: b"".join(struct.pack("<h", int(s * 32768)) for s in v),
        3: b"".join(struct.pack("<i", int(s * 2**23))[:3] for s in v),
        4: b"".join(struct.pack("<i", int(s * 2**31)) for s in v),
    }
    for width, frames in enc.items():
        got = load_wav(wav_bytes(frames, 16000, width, 1), "rec", 16000)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.float32(v))
    stereo = b"".join(struct.pack("<hh", int(a * 32768), int(b * 32768)) for a, b in zip(v, v[::-1]))
    (tmp_path / "s.wav").write_bytes(wav_bytes(stereo, 16000, 2, 2))
    got = load_wav(tmp_path / "s.wav", "rec", 16000)
    np.testing.assert_allclose(got, (np.array(v) + np.array(v[::-1])) / 2, atol=1e-7)


def test_resample_keeps_the_band_and_removes_aliases():
    t_in = np.arange(44100) / 44100
    y = resample(np.sin(2 * np.pi * 1000 * t_in), 44100, 16000)
    assert len(y) == 16000
    inner = slice(200, -200)  # edges see the zeros beyond the clip
    want = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(y[inner] - want[inner]).max() < 2e-3
    alias = resample(np.sin(2 * np.pi * 12000 * t_in), 44100, 16000)  # above the new Nyquist (8 kHz)
    assert np.sqrt(np.mean(alias[inner] ** 2)) < 1e-2
    up = resample(np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000), 8000, 16000)
    assert len(up) == 16000 and np.abs(up[inner] - want[inner]).max() < 2e-3
    pcm = b"".join(struct.pack("<h", int(s * 16000)) for s in np.sin(2 * np.pi * 440 * np.arange(800) / 8000))
    assert load_wav(wav_bytes(pcm, 8000, 2, 1), "rec", 16000).shape == (1600,)


@pytest.mark.parametrize("rate_in, rate_out", [(22050, 16000), (8000, 11025), (44101, 16000), (16000, 8000)])
def test_resample_is_the_windowed_sinc_sum(rate_in, rate_out):
    """y[k] = Σ_n x[n]·c·sinc(c·(t_k − n))·hann over |t_k − n| < 32/c, t_k = k·rate_in/rate_out, summed
    directly here over every input sample."""
    x = np.random.default_rng(1).standard_normal(300)
    got = resample(x, rate_in, rate_out)
    c, n = min(1.0, rate_out / rate_in), np.arange(len(x))
    half = np.ceil(32 / c)
    assert len(got) == int(np.ceil(len(x) * rate_out / rate_in))
    for k in range(0, len(got), 7):
        d = k * rate_in / rate_out - n
        hann = np.where(np.abs(d) < half, 0.5 + 0.5 * np.cos(np.pi * d / half), 0.0)
        assert abs(got[k] - np.sum(x * c * np.sinc(c * d) * hann)) < 1e-12


def test_load_wav_errors_name_the_record(tmp_path):
    float_wav = bytearray(wav_bytes(b"\0" * 8, 16000, 4, 1))
    float_wav[20:22] = struct.pack("<H", 3)  # WAVE_FORMAT_IEEE_FLOAT: not PCM
    cases = [(tmp_path / "missing.wav", "does not exist"), (b"RIFF....WAVEjunk", "cannot decode"),
             (bytes(float_wav), "cannot decode"), (wav_bytes(b"", 16000, 2, 1), "no samples")]
    for source, what in cases:
        with pytest.raises(DataError, match=f"train.jsonl:3 segment 2.*{what}"):
            load_wav(source, "train.jsonl:3 segment 2", 16000)
