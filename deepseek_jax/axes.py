"""The axis vocabulary: shape letters for names and einsums, logical names for sharding.

Shape letters (a tensor's name ends in its shape, einsum strings use the same letters):
  B batch, T query positions, S key/value positions, D model width (`dim`), F MLP hidden,
  V vocabulary, L layers, M flattened tokens (B*T), N heads, H q/k head dim without rope,
  R rope head dim, O value head dim, Q query latent (`q_lora_rank`), C KV latent (`kv_lora_rank`),
  E routed experts, A experts per token, K KV heads (GQA), G heads per KV head, I/J mHC streams.

Logical names say how a dimension may be sharded; mesh files in `configs/mesh/` map them to mesh
axes. Parameters use bare nouns, activations an `act_` prefix, so FSDP can shard a weight's
`embed` while the activation's `act_embed` stays whole.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PARAM_AXES = frozenset(
    {
        "embed",  # D of a weight
        "vocab",  # V
        "mlp",  # F of dense and shared-expert MLPs
        "expert_mlp",  # F of routed experts
        "heads",  # N
        "head_dim",  # H, R, O
        "q_latent",  # Q
        "kv_latent",  # C (and C+R for the fused down projection)
        "experts",  # E
        "layers",  # L, the scan axis
        "engram_rows",  # rows of an Engram table (hashed n-gram memory; sharded by row, looked up in place)
    }
)
ACT_AXES = frozenset(
    {
        "act_batch",  # B (or M for flattened tokens)
        "act_seq",  # T, S
        "act_embed",  # D
        "act_mlp",  # F
        "act_heads",  # N
        "act_vocab",  # V
    }
)
LOGICAL_AXES = PARAM_AXES | ACT_AXES

Init = Callable[..., jax.Array]


def param(
    module: nn.Module,
    name: str,
    axes: Sequence[str | None],
    shape: Sequence[int],
    init: Init = nn.initializers.lecun_normal(),
    dtype=jnp.float32,
) -> jax.Array:
    """Declares a parameter; every dimension carries a logical axis name."""
    assert len(axes) == len(shape), (name, axes, shape)
    assert set(axes) <= PARAM_AXES | {None}, (name, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names (a no-op without a mesh and rules)."""
    assert x.ndim == len(axes) and set(axes) <= ACT_AXES | {None}, (x.shape, axes)
    return nn.with_logical_constraint(x, tuple(axes))


def dense_init(in_axes: Sequence[int], out_axes: Sequence[int], batch_axes: Sequence[int] = ()) -> Init:
    """Truncated normal with variance 1/fan_in, fan_in being the product of `in_axes`."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=tuple(out_axes),
        batch_axis=tuple(batch_axes),
    )
