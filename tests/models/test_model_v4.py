"""The V4 model as a whole (the layers have their own parity tests; the model's HF parity is
test_parity_v4.py): the layer schedule's segments, step-by-step decoding vs the full forward across
window and compression-block boundaries, MTP causality, the router-bias bookkeeping of hash layers,
and the MTP tensors' conversion names.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, load_model_config
from deepseek_jax.convert import table, v4
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.source import split_fused
from deepseek_jax.models import build_cache, build_model, layer_segments, router_bias_rows
from tests.utils import CONFIGS, TINY_V4_OVERRIDES, assert_close

TINY_V4 = CONFIGS / "model/tiny_v4.yaml"
B, T = 2, 40


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config([TINY_V4], TINY_V4_OVERRIDES)
    model = build_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :8]))
    return cfg, model, variables, tokens


def test_segments_of_the_released_schedules():
    names = lambda ratios, n_hash: [s.name for s in layer_segments(  # noqa: E731
        [(r, i < n_hash) for i, r in enumerate(ratios)])]
    flash = [0, 0] + [4, 128] * 20 + [4]
    pro = [128, 128, 4] + [128, 4] * 29
    assert names(flash, 3) == ["layers_0_1", "layers_2", "layers_3_42"]
    assert names(pro, 3) == ["layers_0_1", "layers_2", "layers_3_60"]
    assert names([0, 4, 16, 4], 1) == ["layers_0", "layers_1", "layers_2", "layers_3"]


def test_decode_step_by_step_equals_full_forward(tiny):
    cfg, model, variables, tokens = tiny
    full = jax.jit(lambda v, t: model.apply(v, t, mtp=False).logits)(variables, tokens)

    @jax.jit
    def step(cache, token_B1, index):
        out = model.apply(variables, token_B1, cache=cache, cache_index=index, mtp=False)
        return out.logits[:, -1], out.cache

    cache = build_cache(cfg, B, T, jnp.float32)
    got = []
    for t in range(T):
        logits, cache = step(cache, tokens[:, t : t + 1], jnp.int32(t))
        got.append(logits)
    got = jnp.stack(got, axis=1)
    print(f"\nV4 decode (40 single steps) vs full forward: max err {float(jnp.abs(got - full).max()):.2e}")
    assert_close(got, full, rtol=1e-4, atol=1e-4, what="V4 step-by-step logits")


def test_mtp_is_causal_and_present(tiny):
    cfg, model, variables, tokens = tiny
    fwd = jax.jit(lambda v, t: model.apply(v, t))
    out = fwd(variables, tokens)
    assert out.mtp.logits.shape == (1, B, T, cfg.vocab_size) and np.isfinite(np.asarray(out.mtp.logits)).all()
    i = 20  # MTP slot i reads tokens <= i + 1: changing token i + 2 must not move slots <= i
    changed = tokens.at[:, i + 2].set((tokens[:, i + 2] + 1) % cfg.vocab_size)
    out2 = fwd(variables, changed)
    np.testing.assert_array_equal(np.asarray(out.mtp.logits[:, :, : i + 1]), np.asarray(out2.mtp.logits[:, :, : i + 1]))
    assert np.abs(np.asarray(out.mtp.logits[:, :, i + 1] - out2.mtp.logits[:, :, i + 1])).max() > 0
    assert set(variables["params"]["mtp_0"]) >= {"w_e", "w_h", "enorm", "hnorm", "norm", "hc_head", "block"}


def test_bias_rows_skip_hash_layers(tiny):
    cfg, model, variables, _ = tiny
    rows = router_bias_rows(cfg)
    assert [r.path for r in rows] == [(f"layers_{i}", "block_0", "ffn", "bias") for i in (1, 2, 3)] + [
        ("mtp_0", "block", "ffn", "bias")]
    assert [(r.source, r.rows) for r in rows] == [("main", (1,)), ("main", (2,)), ("main", (3,)), ("mtp", 0)]
    assert "tid2eid" in variables["router"]["layers_0"]["block_0"]["ffn"]
    assert "bias" not in variables["router"]["layers_0"]["block_0"]["ffn"]


def test_mtp_tensors_convert_both_ways(tiny):
    cfg, _, variables, _ = tiny
    state = table.from_variables(jax.tree.map(np.asarray, variables), v4.FAMILY, cfg, "hf_memory")  # per expert
    assert "mtp.0.e_proj.weight" in state and "mtp.0.hc_head.hc_fn" in state
    assert "model.layers.0.mlp.gate.tid2eid" in state and state["model.layers.0.mlp.gate.tid2eid"].dtype == np.int64
    back = table.to_variables(split_fused(state), v4.FAMILY, cfg, "hf_memory")
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves_with_path(back)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(p))
    no_mtp = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    # in memory, a config with MTP needs the mtp.* tensors; the error lists them (a checkpoint
    # directory without them imports without MTP: convert/source.py open_source)
    with pytest.raises(ConversionError, match=r"missing \['mtp\.0\.[^]]*\]\.\.\. \(\d+\), unexpected \[\] \(0\)"):
        table.to_variables(no_mtp, v4.FAMILY, cfg, "hf_memory")


def test_v4_config_errors():
    with pytest.raises(ConfigError, match="compress_ratios needs 5 entries"):
        load_model_config([TINY_V4], ["model.compress_ratios=[0,4,16,4]"])
    with pytest.raises(ConfigError, match="exactly one attention section"):
        load_model_config([TINY_V4, CONFIGS / "model/tiny.yaml"])
    with pytest.raises(ConfigError, match="unknown top-level section"):
        load_model_config([TINY_V4], ["v4.window_size=8"])
    with pytest.raises(ConfigError, match="n_hash_layers"):
        load_model_config([TINY_V4], ["model.moe.n_hash_layers=5"])


@pytest.mark.slow  # four prefill / step / forward compiles (~1 min on 2 cores)
def test_generate_ragged_prompts_one_at_a_time(tiny):
    from deepseek_jax.generate import generate

    cfg, model, variables, tokens = tiny
    prompts = [list(map(int, tokens[0, :3])), list(map(int, tokens[1, :5]))]
    out = generate(model, variables, prompts, max_new_tokens=3, eos_id=-1)
    full = jax.jit(lambda v, t: model.apply(v, t, mtp=False).logits)
    for p, new in zip(prompts, out):
        assert len(new) == 3
        seq = jnp.asarray([p + new[:2]], jnp.int32)  # greedy: token k+1 is the argmax after token k
        want = np.asarray(jnp.argmax(full(variables, seq)[0, len(p) - 1 :], -1))
        assert new == list(map(int, want)), (new, want)
