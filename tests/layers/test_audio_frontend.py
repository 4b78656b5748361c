"""The audio front-end (layers/audio.py) against a float64 numpy statement (media_numpy.audio_clip).

- clips of different lengths in one batch (padding frames full of large noise, an empty clip slot):
  every clip's first n_tokens(len) tokens equal the numpy front-end run on that clip alone (max abs
  error ≤ 1e-5 of the output scale) and the JAX front-end run on the clip alone, unpadded;
- token counts follow AudioConfig.n_tokens (each conv ⌈n / stride⌉), for strides (2, 2) and (3, 1).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config.media import AudioConfig
from deepseek_jax.layers.audio import AudioFrontEnd
from tests.layers import media_numpy as ref
from tests.utils import assert_close, assert_close_to_scale

pytestmark = pytest.mark.usefixtures("highest_precision")
D = 24


def setup(strides):
    cfg = AudioConfig(audio_token_id=0, n_mels=8, conv_channels=16, conv_strides=strides)
    model = AudioFrontEnd(cfg, D, jnp.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 1, 5, cfg.n_mels)), jnp.full((1, 1), 5, jnp.int32))
    params = ref.randomize(nn.unbox(variables)["params"], np.random.default_rng(1))
    return cfg, model, params


@pytest.mark.parametrize("strides", [(2, 2), (3, 1)])
def test_clips_in_a_batch_equal_each_clip_alone(strides):
    cfg, model, params = setup(strides)
    rng = np.random.default_rng(2)
    F, lengths = 21, np.array([[13, 21, 0], [1, 7, 20]], np.int32)
    mel = rng.standard_normal((2, 3, F, cfg.n_mels)).astype(np.float32)
    pad = np.arange(F)[None, None, :] >= lengths[..., None]
    mel[pad] = 1e3 * rng.standard_normal((pad.sum(), cfg.n_mels))  # padding frames must not leak in
    apply = jax.jit(model.apply)
    got = np.asarray(apply({"params": params}, mel, lengths))
    assert got.shape == (2, 3, cfg.n_tokens(F), D) and np.isfinite(got).all()
    w = ref.official_audio(params, len(strides))
    for b, a in zip(*np.nonzero(lengths)):
        n = int(lengths[b, a])
        U = cfg.n_tokens(n)
        want = ref.audio_clip(w, mel[b, a, :n], strides)
        assert want.shape[0] == U
        assert_close_to_scale(got[b, a, :U], want, rtol=1e-5, what=f"clip ({b}, {a}) of {n} frames vs numpy")
        alone = np.asarray(apply({"params": params}, mel[b : b + 1, a : a + 1, :n], lengths[b : b + 1, a : a + 1]))
        assert_close(got[b, a, :U], alone[0, 0], rtol=1e-6, atol=1e-6, what=f"clip ({b}, {a}) batched vs alone")
