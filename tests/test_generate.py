"""Cached generation: greedy decoding equals argmax of the full forward, left padding is invisible,
and top-p sampling keeps exactly the nucleus."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.generate import generate, sample_logits
from deepseek_jax.models import build_model
from tests.utils import CONFIGS

TINY = CONFIGS / "model/tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config([TINY])
    cfg = dataclasses.replace(cfg, vocab_size=64, n_layers=2, num_nextn_predict_layers=0, dtype="float32")
    model = build_model(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return model, variables


def greedy_without_cache(model, variables, prompt, n):
    """Re-runs the full forward on the growing sequence (right-padded to one length: causal)."""
    forward = jax.jit(lambda v, t: model.apply(v, t).logits)
    ids, width = list(prompt), len(prompt) + n
    for _ in range(n):
        padded = jnp.asarray([ids + [0] * (width - len(ids))])
        ids.append(int(jnp.argmax(forward(variables, padded)[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_full_forward_argmax(tiny):
    model, variables = tiny
    prompt = [5, 9, 2, 33, 17]
    with jax.default_matmul_precision("highest"):
        got = generate(model, variables, [prompt], max_new_tokens=8, eos_id=-1)[0]
        want = greedy_without_cache(model, variables, prompt, 8)
    assert got == want


def test_left_padding_does_not_change_a_prompt(tiny):
    model, variables = tiny
    short, long = [7, 3], [1, 2, 3, 4, 5, 6, 7]
    with jax.default_matmul_precision("highest"):
        alone = generate(model, variables, [short], max_new_tokens=6, eos_id=-1)[0]
        batched = generate(model, variables, [long, short], max_new_tokens=6, eos_id=-1, pad_id=11)
    assert batched[1] == alone


def test_chunked_prefill_with_left_padding_gives_one_shot_tokens(tiny):
    """Chunks of 3 over a 7-token batch whose short row is left-padded by 5: its first chunk is padding."""
    model, variables = tiny
    prompts = [[1, 2, 3, 4, 5, 6, 7], [7, 3]]
    with jax.default_matmul_precision("highest"):
        one_shot = generate(model, variables, prompts, max_new_tokens=5, eos_id=-1, pad_id=11, prefill_chunk=0)
        chunked = generate(model, variables, prompts, max_new_tokens=5, eos_id=-1, pad_id=11, prefill_chunk=3)
    assert chunked == one_shot


def test_stops_at_eos(tiny):
    model, variables = tiny
    first = generate(model, variables, [[5, 9]], max_new_tokens=4, eos_id=-1)[0]
    assert generate(model, variables, [[5, 9]], max_new_tokens=4, eos_id=first[1])[0] == first[:1]


def test_too_long_request_is_refused(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="exceed model.max_seq_len"):
        generate(model, variables, [[1] * 10], max_new_tokens=model.cfg.max_seq_len, eos_id=0)


def test_top_p_samples_only_from_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None].repeat(2000, 0)
    draws = np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    assert set(np.unique(draws)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    frac0 = (draws == 0).mean()
    assert abs(frac0 - 0.5 / 0.8) < 0.04  # renormalised inside the nucleus
    greedy = np.asarray(sample_logits(logits[:3], jax.random.key(1), temperature=0.0, top_p=1.0))
    assert (greedy == 0).all()
