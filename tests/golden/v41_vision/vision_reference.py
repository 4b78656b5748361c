"""A float64 numpy statement of DeepSeek-V4.1's vision path: ViT with 2D RoPE, the r×r aligner and the
merge of image spans into the token embeddings, written from shared/reference/deepseek_v41_architecture.md
§3.2-§3.4 (not from any model code). generate_fixture.py (same folder) feeds its output, cast to float32, to
transformers' text model as `inputs_embeds`; the parity test reads the stored outputs.

Weights are a dict of official checkpoint names (`vision.patch_embed.proj.weight`, `vision.blocks.{b}.attn.
wqkv.weight`, `aligner.w1.bias`, `image_start`, ...; Linear weights [out, in]). Shapes: one picture's patches
[P = h·w, 3·p²] in row-major patch order; `grid` = (h, w) in patches.
"""

import numpy as np

TEXT, IMAGE_START, IMAGE, NEWLINE, IMAGE_END = -1, 0, 1, 2, 3  # official slot codes (§3.4)


def rms_norm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def linear(x, w, b=None):
    y = x @ np.asarray(w, np.float64).T
    return y if b is None else y + b


def rope_2d_angles(grid, head_dim, theta):
    """[P, head_dim/2]: (row·f_0 .. row·f_{n-1}, col·f_0 .. col·f_{n-1}), f_i = θ^(−2i/(head_dim/2)),
    n = head_dim/4, patches in row-major order."""
    h, w = grid
    n = head_dim // 4
    f = theta ** (-2.0 * np.arange(n, dtype=np.float64) / (head_dim // 2))
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([rows.reshape(-1, 1) * f, cols.reshape(-1, 1) * f], axis=-1)


def rope_2d(x, grid, theta):
    """Half-split rotation of x [P, heads, head_dim]: channel c < head_dim/2 turns with c + head_dim/2
    by angle c: [x1; x2] -> [x1 cos − x2 sin; x2 cos + x1 sin]."""
    half = x.shape[-1] // 2
    ang = rope_2d_angles(grid, x.shape[-1], theta)[:, None, :]  # [P, 1, half]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(x, grid, wts, pre, heads, theta):
    """Bidirectional multi-head attention over one picture's patches; fused qkv split q | k | v."""
    P, W = x.shape
    hd = W // heads
    qkv = linear(x, wts[pre + "attn.wqkv.weight"], wts[pre + "attn.wqkv.bias"])
    q, k, v = (qkv[:, i * W:(i + 1) * W].reshape(P, heads, hd) for i in range(3))
    q, k = rope_2d(q, grid, theta), rope_2d(k, grid, theta)
    logits = np.einsum("qnd,knd->nqk", q, k) * hd ** -0.5
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("nqk,knd->qnd", p, v).reshape(P, W)
    return linear(out, wts[pre + "attn.wo.weight"], wts[pre + "attn.wo.bias"])


def mlp(x, wts, pre):
    """w1 [2F, W] -> [gate | up]; silu(gate)·up; w2 [W, F]. No biases."""
    gu = linear(x, wts[pre + "mlp.w1.weight"])
    F = gu.shape[-1] // 2
    gate, up = gu[:, :F], gu[:, F:]
    return linear(gate / (1.0 + np.exp(-gate)) * up, wts[pre + "mlp.w2.weight"])


def vit(patches, grid, wts, cfg):
    """One picture: patch embed (bias, no position embedding), pre-norm blocks, final norm -> [P, W]."""
    wts = {k: np.asarray(v, np.float64) for k, v in wts.items()}
    x = linear(np.asarray(patches, np.float64), wts["vision.patch_embed.proj.weight"],
               wts["vision.patch_embed.proj.bias"])
    for b in range(cfg["layers"]):
        pre = f"vision.blocks.{b}."
        x = x + attention(rms_norm(x, wts[pre + "norm1.weight"], cfg["eps"]), grid, wts, pre, cfg["heads"],
                          cfg["theta"])
        x = x + mlp(rms_norm(x, wts[pre + "norm2.weight"], cfg["eps"]), wts, pre)
    return rms_norm(x, wts["vision.norm.weight"], cfg["eps"])


def unshuffle(feats, grid, r):
    """[h·w, W] -> [⌈h/r⌉·⌈w/r⌉, W·r²]: zero-pad bottom/right to multiples of r, windows in row-major
    order, features channel-major (index c·r² + ky·r + kx)."""
    h, w = grid
    W = feats.shape[-1]
    H2, W2 = -(-h // r) * r, -(-w // r) * r
    g = np.zeros((H2, W2, W), np.float64)
    g[:h, :w] = np.asarray(feats, np.float64).reshape(h, w, W)
    win = g.reshape(H2 // r, r, W2 // r, r, W).transpose(0, 2, 4, 1, 3)  # [gy, gx, c, ky, kx]
    return win.reshape((H2 // r) * (W2 // r), W * r * r)


def aligner(feats, grid, wts, r):
    """unshuffle -> w1 (+bias) -> exact GELU -> w2 (+bias): one row per LLM image token."""
    from math import erf, sqrt

    wts = {k: np.asarray(v, np.float64) for k, v in wts.items()}
    x = linear(unshuffle(feats, grid, r), wts["aligner.w1.weight"], wts["aligner.w1.bias"])
    x = x * 0.5 * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))
    return linear(x, wts["aligner.w2.weight"], wts["aligner.w2.bias"])


def image_slots(n_llm_h, n_llm_w):
    """START, (IMAGE × w, NEWLINE) × h, END."""
    return [IMAGE_START] + ([IMAGE] * n_llm_w + [NEWLINE]) * n_llm_h + [IMAGE_END]


def span_slots(ids, grids, image_token_id, r):
    """Slot codes of one row: runs of `image_token_id`, split into consecutive images by their grids
    (each image takes h'·(w'+1)+2 positions, h', w' = ⌈n_vit/r⌉), TEXT elsewhere."""
    ids = np.asarray(ids)
    slots = np.full(ids.shape, TEXT, np.int64)
    t, k = 0, 0
    while t < len(ids):
        if ids[t] != image_token_id:
            t += 1
            continue
        h, w = (-(-int(n) // r) for n in grids[k])
        span = image_slots(h, w)
        assert (ids[t:t + len(span)] == image_token_id).all(), f"image {k} span at {t} is cut short"
        slots[t:t + len(span)] = span
        t, k = t + len(span), k + 1
    assert k == len(grids), f"{k} image spans for {len(grids)} grids"
    return slots


def merge(embeds, slots, rows, wts):
    """Overwrite a row's span positions: IMAGE slots take the aligner rows (all images of the row,
    concatenated in order) in reading order; START / NEWLINE / END the learned delimiters."""
    out = np.array(embeds, np.float64)
    learned = {IMAGE_START: "image_start", NEWLINE: "image_newline", IMAGE_END: "image_end"}
    image_pos = np.flatnonzero(slots == IMAGE)
    assert len(image_pos) == len(rows), (len(image_pos), len(rows))
    out[image_pos] = rows
    for code, name in learned.items():
        out[slots == code] = np.asarray(wts[name], np.float64)
    return out
