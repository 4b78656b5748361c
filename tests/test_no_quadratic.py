"""No attention path builds a [T, T] (or [T, T/m]) array: each layer's forward, and value_and_grad for the
training paths, is lowered (jax.jit(...).lower, no compile) at T = 2^17 with tiny widths, where one
[T, T] f32 array alone would take 64 GiB, and the StableHLO text is scanned for any tensor type with two or
more dimensions of at least T/64 = 2048 (catches [T, T] and [T, T/m] for m <= 64, [chunk, S] when a
prefill chunk of T/32 tokens attends to a cache of T slots, and a key chunk or query block of 2048 or
more). Query blocks (512) and key chunks (1024) come from the configs' `*q_block` / `*k_block` fields,
both below the threshold, so only a T-sized second axis can trip it.

Cases: dense MLA training (with packed documents), MLA chunked prefill against a cache, DSA sparse and
dense warm-up training with the index loss, DSA with a cache, V4 SWA / CSA / HCA (ratio 16) training and
chunked prefill, V4 CSA with its index loss, V4.1 source / candidate / reindex / reuse (the consumers
lowered together with the source they read, so the shared state stays internal)."""

import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import IndexerConfig, MLAConfig, RopeConfig, SharedKVConfig, V4AttentionConfig
from deepseek_jax.layers.attention import MLA, V4Attention, init_mla_cache, init_v4_attention_cache
from deepseek_jax.layers.attention.core import causal_mask
from deepseek_jax.layers.attention.v41 import V41Attention

T = 2**17
LIMIT = T // 64  # two dims this large = a quadratic array
CHUNK = T // 32  # prefill chunk written at the end of a T-slot cache
Q_BLOCK, K_BLOCK = 512, 1024
D = 64
TENSOR = re.compile(r"tensor<((?:\d+x)+)[a-z]\w*>")


def big_tensors(text: str, limit: int = LIMIT) -> dict[str, str]:
    """{tensor type: first line using it} for every type with >= 2 dims of at least `limit`."""
    found = {}
    for line in text.splitlines():
        for match in TENSOR.finditer(line):
            dims = [int(d) for d in match.group(1).rstrip("x").split("x")]
            if sum(d >= limit for d in dims) >= 2:
                found.setdefault(match.group(0), line.strip()[:300])
    return found


def blocks(cfg):
    """cfg with its `*q_block` fields at Q_BLOCK and `*k_block` fields at K_BLOCK."""
    names = [f.name for f in dataclasses.fields(cfg)]
    new = {n: Q_BLOCK for n in names if n.endswith("q_block")}
    new.update({n: K_BLOCK for n in names if n.endswith("k_block")})
    return dataclasses.replace(cfg, **new)


def mla(index: str | None = None, train_form: str = "auto") -> MLA:
    cfg = blocks(MLAConfig(n_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                           v_head_dim=16, train_form=train_form))  # fmt: skip
    ic = None
    if index is not None:
        ic = blocks(IndexerConfig(index_n_heads=2, index_head_dim=16, index_topk=64,
                                  index_dense_warmup=index == "warmup"))  # fmt: skip
    return MLA(cfg, RopeConfig(), D, dtype=jnp.float32, index=ic)


def v4_cfg() -> V4AttentionConfig:
    return blocks(V4AttentionConfig(n_heads=2, head_dim=32, rope_head_dim=8, q_lora_rank=32, o_groups=2,
                                    o_lora_rank=16, window_size=128, index_n_heads=2, index_head_dim=16,
                                    index_topk=64))  # fmt: skip


def v4(ratio: int) -> V4Attention:
    return V4Attention(v4_cfg(), RopeConfig(rope_theta=160000.0 if ratio else 10000.0), ratio, D, dtype=jnp.float32)


def v41(role: str, ratio: int) -> V41Attention:
    shared = SharedKVConfig(kv_source_layers=(0,), index_source_layers=(0, 1), candidate_source_layer=0,
                            candidate_topk_blocks=8, candidate_block_size=8)  # fmt: skip
    return V41Attention(v4_cfg(), RopeConfig(rope_theta=160000.0), ratio, D, dtype=jnp.float32, q_head_norm=False,
                        role=role, shared_cfg=shared)  # fmt: skip


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def abstract_params(module, **kwargs):
    x, pos = jnp.zeros((1, 64, D)), jnp.arange(64)[None]
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x, pos, **kwargs))


def accepts(module, name: str) -> bool:
    return name in inspect.signature(type(module).__call__).parameters


def training(module, **kwargs):
    """(fn, args) for value_and_grad over (params, x) of the layer's summed output (plus its index loss
    when it returns one), on T tokens; packed documents when the layer takes segment ids."""
    seg = {"segment_ids_BT": spec((1, T), jnp.int32)} if accepts(module, "segment_ids_BT") else {}

    def loss(params, x_BTD, positions_BT, segs):
        out = module.apply(params, x_BTD, positions_BT, **segs, **kwargs)
        kl = out[2] if len(out) > 2 and isinstance(out[2], jax.Array) and out[2].ndim == 0 else 0.0
        return jnp.sum(out[0]) + kl

    return jax.value_and_grad(loss, argnums=(0, 1)), (abstract_params(module), spec((1, T, D)),
                                                     spec((1, T), jnp.int32), seg)


def prefill(module, cache_fn):
    """(fn, args) for the forward of a CHUNK-token prefill chunk written at slot T − CHUNK of a T-slot cache."""

    def fwd(params, x_BTD, positions_BT, cache):
        return module.apply(params, x_BTD, positions_BT, cache=cache, cache_index=T - CHUNK)[:2]

    cache = jax.eval_shape(cache_fn)
    return fwd, (abstract_params(module), spec((1, CHUNK, D)), spec((1, CHUNK), jnp.int32), cache)


def v4_index_loss():
    module = v4(4)
    if not accepts(module, "index_loss"):
        pytest.fail("V4Attention.__call__ has no index_loss argument yet")
    return training(module, index_loss=True)


def v41_chain(producer_role: str, consumer_role: str | None, ratio: int):
    """(fn, args): value_and_grad of a V4.1 producer (source / candidate) alone, or followed by a consumer
    (reindex / reuse) that reads its shared state, over T tokens."""
    first = v41(producer_role, ratio)
    second = None if consumer_role is None else v41(consumer_role, ratio)
    x, pos = jnp.zeros((1, 64, D)), jnp.arange(64)[None]

    def init_both():
        p1 = first.init(jax.random.key(0), x, pos)
        shared = first.apply(p1, x, pos)[2]
        return p1, None if second is None else second.init(jax.random.key(1), x, pos, shared=shared)

    def loss(params, x_BTD, positions_BT):
        out, _, shared = first.apply(params[0], x_BTD, positions_BT)
        if second is not None:
            out = out + second.apply(params[1], x_BTD, positions_BT, shared=shared)[0]
        return jnp.sum(out)

    return jax.value_and_grad(loss, argnums=(0, 1)), (jax.eval_shape(init_both), spec((1, T, D)),
                                                     spec((1, T), jnp.int32))


CASES = {
    "mla_train_packed": lambda: training(mla()),
    "mla_train_absorbed_packed": lambda: training(mla(train_form="absorbed")),  # latent keys, merged weights
    "mla_prefill_cache": lambda: prefill(mla(), lambda: init_mla_cache(mla().cfg, None, 1, T, jnp.float32)),
    "dsa_sparse_train_index_loss": lambda: training(mla("sparse"), index_loss=True),
    "dsa_warmup_train_index_loss": lambda: training(mla("warmup"), index_loss=True),
    "dsa_prefill_cache": lambda: prefill(mla("sparse"), lambda: init_mla_cache(
        mla("sparse").cfg, mla("sparse").index, 1, T, jnp.float32)),
    "v4_swa_train": lambda: training(v4(0)),
    "v4_csa_train": lambda: training(v4(4)),
    "v4_hca16_train": lambda: training(v4(16)),
    "v4_swa_prefill_cache": lambda: prefill(v4(0), lambda: init_v4_attention_cache(v4_cfg(), 0, 1, T)),
    "v4_csa_prefill_cache": lambda: prefill(v4(4), lambda: init_v4_attention_cache(v4_cfg(), 4, 1, T)),
    "v4_hca16_prefill_cache": lambda: prefill(v4(16), lambda: init_v4_attention_cache(v4_cfg(), 16, 1, T)),
    "v4_csa_index_loss": v4_index_loss,
    "v41_source": lambda: v41_chain("source", None, 2),
    "v41_candidate": lambda: v41_chain("candidate", None, 1),
    "v41_reindex": lambda: v41_chain("candidate", "reindex", 1),
    "v41_reuse": lambda: v41_chain("source", "reuse", 2),
}


# not slow: tracing only, 0.1-1.5 s per case (~10 s for all) on 2 busy cores
@pytest.mark.parametrize("case", list(CASES))
def test_no_quadratic_array(case):
    fn, args = CASES[case]()
    text = jax.jit(fn).lower(*args).as_text()
    big = big_tensors(text)
    assert not big, f"{case}: {len(big)} tensor type(s) with >= 2 dims >= {LIMIT} at T = {T}:\n" + "\n".join(
        f"{t}  in  {line}" for t, line in list(big.items())[:8]
    )


def test_scanner_flags_quadratic_types():
    assert big_tensors("%0 = stablehlo.add : tensor<1x131072x2048xf32>") == {
        "tensor<1x131072x2048xf32>": "%0 = stablehlo.add : tensor<1x131072x2048xf32>"
    }
    assert big_tensors("tensor<131072x131072xi1> tensor<2048x4x2048xbf16>").keys() == {
        "tensor<131072x131072xi1>", "tensor<2048x4x2048xbf16>"
    }
    clean = "tensor<1x131072x2047xf32> tensor<256x1x512x64xf32> tensor<131072xi32> tensor<f32> tensor<1x131072x64xf32>"
    assert big_tensors(clean) == {}


def test_scanner_catches_a_real_causal_mask():
    """The positive control: the dense [T, T] causal mask the old training path built is flagged."""
    text = jax.jit(lambda seg: causal_mask(seg, 1, T)).lower(spec((1, T), jnp.int32)).as_text()
    assert f"tensor<{T}x{T}xi1>" in big_tensors(text) or f"tensor<1x{T}x{T}xi1>" in big_tensors(text)
