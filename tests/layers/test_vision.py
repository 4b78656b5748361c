"""V4.1's vision tower and aligner (layers/vision.py) against float64 numpy statements (media_numpy.py).

- 2D RoPE: half-split, angles (row·f, col·f), checked on its own; q·k depends only on the offset.
- ViT (2 layers, tiny widths): two pictures of different grids packed in one row plus padding, and a
  second row of one picture; each picture equals the numpy ViT run on that picture alone (max abs
  error ≤ 1e-5 of the output scale); padding never reaches a real patch; outputs and grads NaN-free.
- Aligner: grids that pad on one side, both or neither, packed in a row; channel-major features.
- Parameter counts: the tiny configuration (reference §5: 38,016 with delimiters) and V4.1-Flash (§4.4).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config.media import VisionConfig
from deepseek_jax.layers.rope import apply_rope_half
from deepseek_jax.layers.vision import Aligner, VisionTower, rope_2d_cos_sin
from tests.layers import media_numpy as ref
from tests.utils import assert_close, assert_close_to_scale

pytestmark = pytest.mark.usefixtures("highest_precision")

# deepseek_v41_architecture.md §5: hidden 32, heads 2 (head dim 16: 4 frequencies per axis), intermediate 32
CFG = VisionConfig(image_token_id=0, hidden_size=32, num_heads=2, intermediate_size=32, num_layers=2,
                   patch_size=2, downsample_ratio=3, min_pixels=64, max_image_tokens=32)


def pack(rows: list[list[tuple[int, int]]], P: int, rng):
    """Pictures of the given (h, w) patch grids packed per row, padded to P: patches [B, P, C], positions
    [B, P, 2], picture ids [B, P] (-1 padding), and each picture's (row, offset, h, w)."""
    B = len(rows)
    patches = rng.standard_normal((B, P, CFG.patch_dim)).astype(np.float32)
    pos = np.zeros((B, P, 2), np.int32)
    pic = np.full((B, P), -1, np.int32)
    where = []
    for b, grids in enumerate(rows):
        o = 0
        for i, (h, w) in enumerate(grids):
            pos[b, o : o + h * w] = np.stack(np.divmod(np.arange(h * w), w), -1)
            pic[b, o : o + h * w] = i
            where.append((b, o, h, w))
            o += h * w
        pos[b, o:] = rng.integers(0, 50, (P - o, 2))  # padding positions are arbitrary
    return patches, pos, pic, where


def tower_params(seed=0):
    tower = VisionTower(CFG, jnp.float32)
    x = pack([[(1, 1)]], 1, np.random.default_rng(0))[:3]
    params = nn.unbox(tower.init(jax.random.key(seed), *x))["params"]
    return tower, ref.randomize(params, np.random.default_rng(seed + 1))


def test_rope_2d_is_half_split_with_row_then_column_angles():
    rng = np.random.default_rng(0)
    Y, theta = 16, 10000.0
    x = rng.standard_normal((1, 7, 3, Y)).astype(np.float32)
    pos = rng.integers(0, 40, (1, 7, 2)).astype(np.int32)
    cos, sin = rope_2d_cos_sin(jnp.asarray(pos), Y, theta)
    got = apply_rope_half(jnp.asarray(x), cos[:, :, None], sin[:, :, None])
    assert_close(got[0], ref.rope_2d(x[0].astype(np.float64), pos[0], theta), rtol=1e-5, atol=1e-5, what="rope")
    # f_0 = 1: channel 0 turns by the row, channel Y/4 by the column
    for channel, axis in ((0, 0), (Y // 4, 1)):
        np.testing.assert_allclose(np.asarray(cos[0, :, channel]), np.cos(pos[0, :, axis]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(sin[0, :, channel]), np.sin(pos[0, :, axis]), atol=1e-5)
    # q·k depends only on the offset between the two patches
    q, k = x[:, :2], x[:, 2:4]
    dots = []
    for shift in ((0, 0), (5, -3)):
        p = pos[:, :4] + np.asarray(shift, np.int32)
        c, s = rope_2d_cos_sin(jnp.asarray(p), Y, theta)
        rq = apply_rope_half(jnp.asarray(q), c[:, :2, None], s[:, :2, None])
        rk = apply_rope_half(jnp.asarray(k), c[:, 2:, None], s[:, 2:, None])
        dots.append(np.einsum("bpny,bsny->bpsn", rq, rk))
    assert_close(dots[1], dots[0], rtol=1e-5, atol=1e-4, what="relative q·k")


def test_vit_matches_numpy_per_picture_and_ignores_padding():
    rng = np.random.default_rng(1)
    tower, params = tower_params()
    patches, pos, pic, where = pack([[(3, 4), (2, 5)], [(4, 4)]], 28, rng)
    got = np.asarray(jax.jit(tower.apply)({"params": params}, patches, pos, pic))
    assert np.isfinite(got).all(), "ViT output (padding rows included) must be finite"
    w = ref.official_vit(params)
    for b, o, h, wd in where:
        want = ref.vit_picture(w, patches[b, o : o + h * wd].astype(np.float64), pos[b, o : o + h * wd],
                               CFG.num_heads, CFG.norm_eps, CFG.rope_theta)
        assert_close_to_scale(got[b, o : o + h * wd], want, rtol=1e-5, what=f"ViT picture at row {b} offset {o}")
    # padding: any values, any positions, never reach a real patch
    noisy = patches.copy()
    noisy[pic < 0] = 1e3 * rng.standard_normal(((pic < 0).sum(), CFG.patch_dim))
    pos2 = np.where((pic < 0)[..., None], rng.integers(0, 99, pos.shape), pos).astype(np.int32)
    got2 = np.asarray(jax.jit(tower.apply)({"params": params}, noisy, pos2, pic))
    np.testing.assert_array_equal(got2[pic >= 0], got[pic >= 0])


def test_vit_grads_are_finite_with_padding():
    tower, params = tower_params()
    patches, pos, pic, _ = pack([[(2, 3)], [(1, 2)]], 9, np.random.default_rng(2))

    def loss(params, patches):
        return jnp.sum(jnp.sin(tower.apply({"params": params}, patches, pos, pic)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, patches)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("grids", [[(2, 5), (4, 7)], [(7, 2), (3, 6)], [(3, 5), (4, 6), (1, 1)]],
                         ids=["both-both", "both-neither", "right-bottom-1x1"])
def test_aligner_matches_numpy_per_picture(grids):
    rng = np.random.default_rng(3)
    r, D = CFG.downsample_ratio, 24
    P = sum(h * w for h, w in grids) + 3
    feats = rng.standard_normal((1, P, CFG.hidden_size)).astype(np.float32)
    where = [(0, o, h, w) for (h, w), o in zip(grids, np.cumsum([0] + [h * w for h, w in grids]))]
    M = sum(-(-h // r) * -(-w // r) for h, w in grids) + 2  # two padding rows
    unshuffle, first = ref.unshuffle_indices(where, r, M, 1)
    aligner = Aligner(CFG, D, jnp.float32)
    params = nn.unbox(aligner.init(jax.random.key(0), feats, unshuffle))["params"]
    params = ref.randomize(params, np.random.default_rng(4))
    got = np.asarray(jax.jit(aligner.apply)({"params": params}, feats, unshuffle))
    w = ref.official_aligner(params)
    for (_, o, h, wd), m in zip(where, first):
        want = ref.aligner_picture(w, feats[0, o : o + h * wd].reshape(h, wd, -1).astype(np.float64), r)
        assert_close_to_scale(got[0, m : m + len(want)], want, rtol=1e-5, what=f"aligner rows of grid {h}x{wd}")


def test_aligner_features_are_channel_major():
    """Feature c of window cell (ky, kx) meets row c·r² + ky·r + kx of the official w1."""
    r, W, D = CFG.downsample_ratio, CFG.hidden_size, 4
    aligner = Aligner(CFG, D, jnp.float32)
    c, ky, kx = 5, 1, 2
    feats = np.zeros((1, r * r, W), np.float32)
    feats[0, ky * r + kx, c] = 1.0
    unshuffle = np.arange(r * r, dtype=np.int32)[None, None]
    w1 = np.zeros((W * r * r, D), np.float32)
    w1[c * r * r + ky * r + kx, 0] = 2.0
    params = {"w1": w1.reshape(W, r * r, D), "b1": np.zeros(D, np.float32), "w2": np.eye(D, dtype=np.float32),
              "b2": np.zeros(D, np.float32)}
    got = np.asarray(aligner.apply({"params": params}, feats, unshuffle))
    np.testing.assert_allclose(got[0, 0], [ref.gelu(2.0), 0, 0, 0], atol=1e-6)


def test_tiny_v41_vision_parameter_count():
    """Reference §5: vision + aligner + 3 delimiters = 38,016 at LM width 64 (aligner hidden = 64)."""
    x = pack([[(1, 1)]], 1, np.random.default_rng(0))[:3]
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    tower = jax.eval_shape(VisionTower(CFG).init, jax.random.key(0), *x)
    aligner = jax.eval_shape(Aligner(CFG, 64).init, jax.random.key(0), jnp.zeros((1, 1, 32)),
                             jnp.zeros((1, 1, 9), jnp.int32))
    assert count(tower) == 15_168 and count(aligner) == 22_656
    assert count(tower) + count(aligner) + 3 * 64 == 38_016


def test_flash_vision_parameter_count():
    """Reference §4.4, from the checkpoint shapes: tower 411,842,560, aligner 73,410,560 (V4.1-Flash
    defaults of VisionConfig, LM width 5120); abstract init, nothing allocated."""
    c = VisionConfig()
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    tower = jax.eval_shape(VisionTower(c).init, jax.random.key(0), jnp.zeros((1, 1, c.patch_dim)),
                           jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    aligner = jax.eval_shape(Aligner(c, 5120).init, jax.random.key(0), jnp.zeros((1, 1, c.hidden_size)),
                             jnp.zeros((1, 1, 9), jnp.int32))
    assert (count(tower), count(aligner)) == (411_842_560, 73_410_560)
