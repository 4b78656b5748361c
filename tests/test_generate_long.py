"""Long-context generation: chunked prefill gives one-shot prefill's tokens (V3, V3.2, V4, V4.1),
prompts of different lengths on row-position models (V4 / V4.1) decode in one batch with each row's
own cache index and give one-prompt-at-a-time tokens (Engram included), the 1M-context tiny V4 config,
and decoding after a long chunked prefill (deepseek_jax/long_decode.py).

Reference for the token checks: the same model's one-shot prefill of one prompt at a time (itself
checked against the full forward in tests/test_generate.py and tests/models/). Greedy tokens are compared
exactly; logits at TOL["model_f32"]."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import generate as gen
from deepseek_jax.config import load_model_config
from deepseek_jax.long_decode import cache_nbytes
from deepseek_jax.models import build_cache, build_model, init_inputs
from tests.utils import CONFIGS, ROOT, TINY_V4_OVERRIDES, TOL, assert_close

MODEL = CONFIGS / "model"
V4_NO_MTP = TINY_V4_OVERRIDES + ["model.num_nextn_predict_layers=0", "model.compress_ratios=[0,4,16,4]"]
V41 = ["model.vocab_size=256", "model.engram.compressed_vocab_size=128", "model.num_nextn_predict_layers=0",
       "model.compress_ratios=[0,0,2,2,2,1,1,1,1]", "model.dspark=null"]
CMAP = np.arange(256) % 128  # the Engram fold of the 256 ids
SMALL = {  # config, overrides, engram_map
    "v3": ("tiny.yaml", ["model.vocab_size=64", "model.n_layers=2", "model.num_nextn_predict_layers=0"], None),
    "v32": ("tiny_v32.yaml", ["model.vocab_size=64", "model.n_layers=2", "model.num_nextn_predict_layers=0",
                              "model.index.index_topk=4"], None),
    "v4": ("tiny_v4.yaml", V4_NO_MTP, None),
    "v41": ("tiny_v41.yaml", V41, CMAP),
}
PROMPTS = [[int(t) for t in np.random.default_rng(k).integers(2, 64, n)] for k, n in enumerate((21, 13, 21))]
# every test decodes N_NEW tokens (a cache of P + N_NEW slots) with chunks of CHUNK: the prefills and decode
# steps of one prompt length are one compile each, shared across the tests (the persistent compilation cache)
N_NEW, CHUNK = 6, 8


def small_model(name):
    path, overrides, cmap = SMALL[name]
    cfg = load_model_config([MODEL / path], overrides)
    model = build_model(cfg)
    tokens, kwargs = init_inputs(cfg, 8)
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, **kwargs)), cmap


@pytest.mark.slow  # two prefill shapes and a decode step per model (~30–90 s each on 2 cores)
@pytest.mark.parametrize("name", ["v3", "v32", "v4", "v41"])
def test_chunked_prefill_gives_one_shot_tokens(name):
    model, variables, cmap = small_model(name)
    prompt = PROMPTS[0]  # 21 tokens: chunks of 8 cross V4's window (8) and compression blocks (4, 16)
    with jax.default_matmul_precision("highest"):
        one_shot = gen.generate(model, variables, [prompt], N_NEW, eos_id=-1, engram_map=cmap, prefill_chunk=0)
        chunked = gen.generate(model, variables, [prompt], N_NEW, eos_id=-1, engram_map=cmap, prefill_chunk=CHUNK)
    assert chunked == one_shot


@pytest.mark.slow  # one-shot vs chunked prefill logits of the tiny V4 (~5 s after the test above: its compiles)
def test_chunked_prefill_logits_match_one_shot():
    model, variables, _ = small_model("v4")
    tokens_1P = np.asarray([PROMPTS[0]], np.int32)
    with jax.default_matmul_precision("highest"):
        want, _ = gen.prefill(model, variables, tokens_1P, build_cache(model.cfg, 1, 21 + N_NEW), 0)
        got, cache = gen.prefill(model, variables, tokens_1P, build_cache(model.cfg, 1, 21 + N_NEW), CHUNK)
    assert_close(got, want, **TOL["model_f32"], what="last logits, chunks of 8 vs one call")


@pytest.mark.slow  # batched row prefill + vmapped decode vs three one-prompt runs (~1-1.5 min)
@pytest.mark.parametrize("name", ["v4", "v41"])
def test_unequal_prompts_batch_like_one_at_a_time(name):
    """Prompts of lengths 21, 13, 21 on a row-position model: rows of one length share a prefill, the
    decode is one vmapped step with a [B] cache index; greedy tokens equal each prompt run alone. The
    sampling path (temperature, a nucleus cutoff per row) in the batched step: a nucleus of 1e-6 keeps
    only each row's argmax, so it too gives each prompt's tokens alone. (One key draws the whole
    batch's samples, so a sampled row is not the prompt's sample alone: top-p 0.9 is checked in range.)"""
    model, variables, cmap = small_model(name)
    assert model.cfg.row_positions
    run = lambda prompts, **kw: gen.generate(model, variables, prompts, N_NEW, eos_id=-1, engram_map=cmap, **kw)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        alone = [run([p], prefill_chunk=0)[0] for p in PROMPTS]
        # the sampled runs take the greedy run's chunks: one set of batched prefill compiles (the row prefill
        # is the same code at any chunk; test_chunked_prefill_gives_one_shot_tokens checks chunks vs one call)
        batched = run(PROMPTS, prefill_chunk=CHUNK)
        nucleus = run(PROMPTS, temperature=0.7, top_p=1e-6, seed=3, prefill_chunk=CHUNK)
        sampled = run(PROMPTS, temperature=1.0, top_p=0.9, seed=3, prefill_chunk=CHUNK)  # (one precision: no recompile)
    assert batched == alone
    assert nucleus == alone
    assert all(len(row) == N_NEW and all(0 <= t < model.cfg.vocab_size for t in row) for row in sampled)


def test_cache_batch_axes_are_found_for_every_leaf():
    cfg = load_model_config([MODEL / "tiny_v4.yaml"], V4_NO_MTP)
    axes = gen._batch_axes(cfg)
    leaves = jax.tree.leaves(jax.eval_shape(lambda: build_cache(cfg, 5, 64)))
    assert len(axes) == len(leaves)
    assert all(leaf.shape[a] == 5 for leaf, a in zip(leaves, axes))


def test_negative_prefill_chunk_is_refused():
    cfg = load_model_config([MODEL / "tiny.yaml"], SMALL["v3"][1])
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        gen.prefill(build_model(cfg), {}, np.zeros((1, 4), np.int32), None, -1)


# ----------------------------------------------------------------------------------------------
# The 1M-context tiny V4


def test_tiny_v4_1m_config_reaches_a_million_tokens_with_a_linear_cache():
    cfg = load_model_config([MODEL / "tiny_v4_1m.yaml"])
    assert cfg.max_seq_len >= 1_048_576 + 1024
    assert cfg.rope.original_seq_len * cfg.rope.rope_factor >= cfg.max_seq_len  # YaRN on CSA / HCA
    assert sorted(set(cfg.compress_ratios)) == [0, 4, 128]
    assert 1 <= cfg.v4.index_n_heads <= 2 and 16 <= cfg.v4.index_head_dim <= 32 and 16 <= cfg.v4.index_topk <= 64
    assert cfg.v4.q_block > 0 and cfg.v4.k_block > 0
    L, X, Y = 1_048_576 + 64, cfg.v4.head_dim, cfg.v4.index_head_dim
    cache = jax.eval_shape(lambda: build_cache(cfg, 1, L))
    fixed = cache_nbytes(jax.eval_shape(lambda: build_cache(cfg, 1, 0)))
    # per token: CSA entries (X) + indexer keys (Y) every 4 slots, HCA entries (X) every 128, f32
    assert cache_nbytes(cache) - fixed == 4 * ((L // 4) * (X + Y) + (L // 128) * X)


@pytest.mark.slow  # traces the model (~8 s)
def test_tiny_v4_1m_decode_step_shapes_at_a_million():
    cfg = load_model_config([MODEL / "tiny_v4_1m.yaml"])
    cache = jax.eval_shape(lambda: build_cache(cfg, 1, 1_048_576 + 64))
    model = build_model(cfg)
    tokens, kwargs = init_inputs(cfg, 8)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens, **kwargs)
    step = jax.eval_shape(lambda v, c: model.apply(v, jnp.zeros((1, 1), jnp.int32), cache=c,
                                                   cache_index=1_000_001, mtp=False), variables, cache)
    assert step.logits.shape == (1, 1, cfg.vocab_size)
    assert jax.tree.structure(step.cache) == jax.tree.structure(cache)


@pytest.mark.slow  # a 131,075-token chunked prefill of the 1M config and 4 decode steps (~2.5 min on 2 cores)
def test_decode_after_a_long_chunked_prefill():
    """The whole 1M run (`decode_at(cfg, 1_000_003, ...)`: 638 s prefill, 17.6 ms per step on 2 CPU cores, see
    docs/long_context.md) is too long for the suite; this runs the same at 131,075 tokens, in its own process
    so the suite's process (thousands of compiled programs by then) does not carry its memory."""
    n = 131_072 + 3
    code = (f"import json; from deepseek_jax.config import load_model_config as L; "
            f"from deepseek_jax.long_decode import decode_at; "
            f"r = decode_at(L([{str(MODEL / 'tiny_v4_1m.yaml')!r}]), {n}, n_new=4, check_tail=3); "
            f"print('RESULT' + json.dumps({{k: r[k] for k in ('finite', 'first_position', 'tokens', "
            f"'tail_max_abs_diff', 'bytes_per_token')}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["finite"] and out["first_position"] == n and len(out["tokens"]) == 4
    # the context's last 3 tokens as one chunk vs three one-token steps: the same logits
    assert out["tail_max_abs_diff"] <= 1e-4, out
    assert 48 <= out["bytes_per_token"] <= 50  # 4 · (32 + 16) / 4 + 4 · 32 / 128 = 49 B per slot
