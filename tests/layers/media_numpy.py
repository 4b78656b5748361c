"""Float64 numpy statements of the media front-ends, written from the equations (deepseek_v41_architecture.md
§3.2–3.3 for the ViT and aligner; deepseek_jax/config/media.py AudioConfig and task text for the audio
front-end), not from the JAX code: loops over channels, pictures and clips where that reads plainest.

Weights are in the official layout transposed to [in, out] (`wqkv` [W, 3W] with q | k | v contiguous and
heads contiguous inside each; `w1` [W, 2F] with [gate | up]; aligner `w1` [W·r², F] with row
c·r² + ky·r + kx); `official_vit` / `official_aligner` state how our Flax parameters map onto them.
"""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def gelu(x):
    """Exact GELU: x · Φ(x) = x/2 · (1 + erf(x/√2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rope_2d(x_PNY, pos_P2, theta):
    """Half-split 2D RoPE: channel c < Y/2 turns with channel c + Y/2 by angle a_c, where a_c = row·f_c
    for c < Y/4 and col·f_{c−Y/4} otherwise, f_i = θ^(−2i/(Y/2))."""
    Y = x_PNY.shape[-1]
    half, quarter = Y // 2, Y // 4
    out = np.array(x_PNY, dtype=np.float64)
    for c in range(half):
        f = theta ** (-2.0 * (c % quarter) / half)
        angle = pos_P2[:, 0 if c < quarter else 1].astype(np.float64) * f
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x1, x2 = x_PNY[:, :, c], x_PNY[:, :, c + half]
        out[:, :, c] = x1 * cos - x2 * sin
        out[:, :, c + half] = x2 * cos + x1 * sin
    return out


def official_vit(p) -> dict:
    """Our VisionTower params -> float64 official-layout weights ([in, out]), layers stacked first."""
    g = lambda a: np.asarray(a, np.float64)  # noqa: E731
    b = p["blocks"]
    L, W = g(b["attn"]["w_qkv"]).shape[:2]
    return {
        "patch_w": g(p["w_patch"]), "patch_b": g(p["b_patch"]), "norm": g(p["norm"]["scale"]),
        "norm1": g(b["norm1"]["scale"]), "norm2": g(b["norm2"]["scale"]),
        "wqkv": g(b["attn"]["w_qkv"]).reshape(L, W, 3 * W), "bqkv": g(b["attn"]["b_qkv"]).reshape(L, 3 * W),
        "wo": g(b["attn"]["w_o"]).reshape(L, W, W), "bo": g(b["attn"]["b_o"]),
        "w1": g(b["mlp"]["w_gate_up"]).reshape(L, W, -1), "w2": g(b["mlp"]["w_down"]),
    }


def vit_picture(w: dict, patches_PC, pos_P2, n_heads: int, eps: float, theta: float):
    """One picture's patches [P, C] at grid positions [P, 2] -> features [P, W]; full attention."""
    x = patches_PC @ w["patch_w"] + w["patch_b"]
    P, W = x.shape
    Y = W // n_heads
    for layer in range(w["wqkv"].shape[0]):
        h = rms_norm(x, w["norm1"][layer], eps)
        qkv = h @ w["wqkv"][layer] + w["bqkv"][layer]
        q, k, v = (qkv[:, i * W : (i + 1) * W].reshape(P, n_heads, Y) for i in range(3))
        q, k = rope_2d(q, pos_P2, theta), rope_2d(k, pos_P2, theta)
        probs = softmax(np.einsum("pny,sny->nps", q, k) / math.sqrt(Y))
        o = np.einsum("nps,sny->pny", probs, v).reshape(P, W)
        x = x + o @ w["wo"][layer] + w["bo"][layer]
        h = rms_norm(x, w["norm2"][layer], eps)
        gate_up = h @ w["w1"][layer]
        F = gate_up.shape[1] // 2
        x = x + (silu(gate_up[:, :F]) * gate_up[:, F:]) @ w["w2"][layer]
    return rms_norm(x, w["norm"], eps)


def official_aligner(p) -> dict:
    g = lambda a: np.asarray(a, np.float64)  # noqa: E731
    W, K, F = g(p["w1"]).shape
    return {"w1": g(p["w1"]).reshape(W * K, F), "b1": g(p["b1"]), "w2": g(p["w2"]), "b2": g(p["b2"])}


def aligner_picture(w: dict, grid_HWC, r: int):
    """One picture's features as a grid [h, w, W] -> LLM tokens [⌈h/r⌉·⌈w/r⌉, D]: zero-pad bottom and
    right to multiples of r, unfold r×r windows row-major, channel-major inside a window."""
    h, wd, C = grid_HWC.shape
    H, Wd = -(-h // r) * r, -(-wd // r) * r
    padded = np.zeros((H, Wd, C))
    padded[:h, :wd] = grid_HWC
    rows = []
    for i in range(H // r):
        for j in range(Wd // r):
            vec = np.zeros(C * r * r)
            for c in range(C):
                for ky in range(r):
                    for kx in range(r):
                        vec[c * r * r + ky * r + kx] = padded[i * r + ky, j * r + kx, c]
            rows.append(vec)
    return gelu(np.stack(rows) @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]


def official_audio(p, n_convs: int) -> dict:
    g = lambda a: np.asarray(a, np.float64)  # noqa: E731
    convs = [(g(p[f"w_conv{i}"]), g(p[f"b_conv{i}"])) for i in range(n_convs)]
    return {"convs": convs, **{k: g(p[k]) for k in ("w_proj1", "b_proj1", "w_proj2", "b_proj2")}}


def audio_clip(w: dict, mel_FN, strides):
    """One clip's valid frames [n, n_mels] alone -> tokens [n_tokens(n), D]: per stride a Conv1d
    (kernel 3, zero padding 1) + GELU, then Linear -> GELU -> Linear."""
    x = np.asarray(mel_FN, np.float64)
    for (k3, bias), s in zip(w["convs"], strides):
        n = x.shape[0]
        y = np.zeros((-(-n // s), k3.shape[2]))
        for u in range(y.shape[0]):
            for k in range(3):
                t = s * u + k - 1
                if 0 <= t < n:
                    y[u] += x[t] @ k3[k]
        x = gelu(y + bias)
    return gelu(x @ w["w_proj1"] + w["b_proj1"]) @ w["w_proj2"] + w["b_proj2"]


def randomize(params: dict, rng: np.random.Generator) -> dict:
    """Test weights: matrices as initialised (fan-in, std 1/√fan_in), norm weights 1 + N(0, 0.1),
    biases N(0, 0.3) (non-zero, so a dropped or misplaced bias shows)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out[k] = randomize(v, rng)
        elif k == "scale":
            out[k] = (1.0 + 0.1 * rng.standard_normal(np.shape(v))).astype(np.float32)
        elif k.startswith("b"):
            out[k] = (0.3 * rng.standard_normal(np.shape(v))).astype(np.float32)
        else:
            out[k] = np.asarray(v, np.float32)
    return out


def unshuffle_indices(where, r: int, M: int, B: int):
    """Host layout of the aligner windows [B, M, r²], pictures given as (row, first patch, h, w): each
    picture's ⌈h/r⌉·⌈w/r⌉ windows (row-major) of patch indices, ky-major inside a window, -1 outside
    the grid; rows past a row's pictures all -1. Also each picture's first aligner row."""
    out = np.full((B, M, r * r), -1, np.int32)
    fill, first = [0] * B, []
    for b, o, h, w in where:
        first.append(fill[b])
        for i in range(-(-h // r)):
            for j in range(-(-w // r)):
                for ky in range(r):
                    for kx in range(r):
                        y, x = i * r + ky, j * r + kx
                        if y < h and x < w:
                            out[b, fill[b], ky * r + kx] = o + y * w + x
                fill[b] += 1
    return out, first
