"""Expert-parallel MoE dispatch: tokens meet the shard that holds their experts.

Routing happens outside (global arrays, so counts and the balance loss are global statistics); this
module moves (token, expert) pairs to the experts and the results back. The expert mesh axes come
from the `experts` logical rule (`sharding.moe_axes`), never from a name written here. With ep
expert shards, shard r holds experts [r·E_l, (r+1)·E_l), E_l = E / ep. Strategies (`moe.dispatch`):

  ring        all-gather the shard's tokens over the expert axes, run the local experts on every
              pair that routes to them, reduce-scatter the partial outputs back. Dropless.
  a2a         `all_to_all` of fixed per-destination buffers of C rows, C = ⌈cf · X_l / ep⌉
              (X_l = the shard's M_l·A pairs; cf = `capacity_factor`, 0 = X_l, dropless). Pairs past
              a destination's C are dropped (they add nothing) and counted.
  ragged_a2a  dropless `jax.lax.ragged_all_to_all` of exactly the routed rows, with offsets from an
              all-gathered [ep, ep] size matrix (accelerators; XLA:CPU does not implement it).
              `ragged_a2a_emulated` runs the same offsets logic with the collective built from
              all-gathers (ep x the traffic): for tests and CPU debugging only.
  dense       GShard: one-hot [M, E, C] dispatch/combine einsums with per-expert capacity
              C = ⌈cf · M_l·A / E⌉ (0 = M_l, dropless) and an all_to_all of the [E, C, D] buffer.

Expert weights enter the shard_map split on E over the expert axes and on F over the `expert_mlp`
axes that do not also split tokens (tensor parallelism: partial sums are psum'd). Any other split
of the stored weights (FSDP on D) is gathered by the shard_map's input resharding — over the FSDP
axes only, never over the expert axes. When the tokens are not split over the expert axes, every
shard already holds every token: each runs its local experts and the partial outputs are psum'd.
Without a mesh the same per-shard code runs once with ep = 1 (no collectives).

With `moe.weight_before_down` (V4) the routing weight scales the expert's hidden activation, so
a2a, ragged_a2a(_emulated) and dense also send each row's weight to the expert shard (one float per row);
ring and the replicated path hold the weights there already. `moe.swiglu_limit` reaches the experts,
and `quant_sim` (experts.py) the FP8 simulation of W_down's input on the expert shard.
"""

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ConfigError, MoEConfig
from deepseek_jax.layers.mlp import swiglu_act
from deepseek_jax.layers.moe.experts import EXPERT_IMPLS
from deepseek_jax.quant import sim_act
from deepseek_jax.sharding import MoEAxes, moe_axes


class _Shards(NamedTuple):
    """The dispatch's mesh axes (looked up through the rules) and the shard count along experts."""

    experts: tuple  # mesh axes splitting E
    hidden: tuple  # mesh axes splitting each expert's F (partial sums psum'd); never token axes
    tokens: tuple  # mesh axes splitting the tokens (batch, then sequence)
    ep: int  # expert shards
    replicated_tokens: bool  # experts split over axes the tokens are not: local experts + psum
    quant_sim: str = "none"  # FP8 simulation of W_down's input (experts.py), static per call


class DispatchError(ConfigError):
    """The configured dispatch cannot run on this backend or mesh; the message names alternatives."""


def check_backend(dispatch: str, platform: str) -> None:
    """Fails early where a strategy cannot run (ragged_a2a on XLA:CPU)."""
    if dispatch == "ragged_a2a" and platform == "cpu":
        raise DispatchError(
            "moe.dispatch=ragged_a2a needs jax.lax.ragged_all_to_all, which XLA:CPU does not implement; "
            "on CPU use moe.dispatch=ring (dropless), a2a (capacity_factor=0 is dropless) or dense "
            "(ragged_a2a_emulated runs its offsets logic through all-gathers, for tests)"
        )


def _axis(axes):
    return axes if len(axes) > 1 else axes[0]


def _all_gather(x, axes):
    return jax.lax.all_gather(x, _axis(axes), axis=0, tiled=True) if axes else x


def _psum(x, axes):
    return jax.lax.psum(x, _axis(axes)) if axes else x


def _all_to_all(x, axes):
    """[ep, ...] chunk d goes to shard d; returns [ep, ...] with chunk s from shard s."""
    return jax.lax.all_to_all(x, _axis(axes), 0, 0, tiled=True) if axes else x


def _rank(axes):
    return jax.lax.axis_index(_axis(axes)) if axes else 0


def _ragged_all_to_all_reference(operand, output, in_off, send, out_off, recv, axes):
    """`ragged_all_to_all` built from all-gathers: rows [in_off[d], +send[d]) of every shard's
    operand land at out_off[d] in shard d's output. Emulation for CPU tests (ep x the traffic)."""
    del recv
    me = _rank(axes)
    ops = jax.lax.all_gather(operand, _axis(axes), axis=0)  # [ep, X, D]
    starts, sizes, dests = (jax.lax.all_gather(a, _axis(axes), axis=0)[:, me] for a in (in_off, send, out_off))
    row = jnp.arange(output.shape[0])
    for s in range(ops.shape[0]):  # static ep
        inside = (row >= dests[s]) & (row < dests[s] + sizes[s])
        src = jnp.take(ops[s], starts[s] + row - dests[s], axis=0, mode="fill", fill_value=0)
        output = jnp.where(inside[:, None], src, output)
    return output


def _ragged_all_to_all(operand, output, in_off, send, out_off, recv, axes):
    return jax.lax.ragged_all_to_all(operand, output, in_off, send, out_off, recv, axis_name=_axis(axes))


def _local_ids(experts, rank, E_l):
    """Global expert ids -> this shard's local ids, -1 for experts held elsewhere."""
    mine = (experts >= rank * E_l) & (experts < (rank + 1) * E_l)
    return jnp.where(mine, experts - rank * E_l, -1)


def _experts(c: MoEConfig, x_MD, ids_MA, weights_MA, w, quant_sim="none"):
    """The configured expert impl on a shard's local experts, partial outputs in float32."""
    return EXPERT_IMPLS[c.impl](x_MD, ids_MA, weights_MA, *w, out_dtype=jnp.float32, limit=c.swiglu_limit,
                                weight_before_down=c.weight_before_down, quant_sim=quant_sim)


def _ring(c, x_MD, experts_MA, weights_MA, mask_M, w, ax):
    ep_axes, E_l = ax.experts, w[0].shape[0]
    xg_MD, eg_MA, gg_MA = (_all_gather(a, ep_axes) for a in (x_MD, experts_MA, weights_MA))
    ids = _local_ids(eg_MA, _rank(ep_axes), E_l)
    y_MD = _psum(_experts(c, xg_MD, ids, gg_MA, w, ax.quant_sim), ax.hidden)
    if ep_axes:
        y_MD = jax.lax.psum_scatter(y_MD, _axis(ep_axes), scatter_dimension=0, tiled=True)
    return y_MD, jnp.int32(0)


def _capacity(cf: float, balanced: float, worst: int) -> int:
    return worst if cf == 0 else max(1, min(worst, math.ceil(cf * balanced)))


def _a2a(c, x_MD, experts_MA, weights_MA, mask_M, w, ax):
    ep_axes, E_l, (M, A) = ax.experts, w[0].shape[0], experts_MA.shape
    ep, X, D = ax.ep, M * A, x_MD.shape[1]
    C = _capacity(c.capacity_factor, X / ep, X)
    flat_X = experts_MA.reshape(-1)
    order_X = jnp.argsort(flat_X // E_l, stable=True)
    dest_X, token_X = flat_X[order_X] // E_l, order_X // A
    start_d = jnp.cumsum(jnp.bincount(dest_X, length=ep)) - jnp.bincount(dest_X, length=ep)
    pos_X = jnp.arange(X) - start_d[dest_X]
    keep_X = pos_X < C
    slot_X = jnp.where(keep_X, dest_X * C + pos_X, ep * C)  # ep*C: dropped, written nowhere
    send_x = jnp.zeros((ep * C, D), x_MD.dtype).at[slot_X].set(jnp.take(x_MD, token_X, axis=0), mode="drop")
    send_id = jnp.full((ep * C,), -1, jnp.int32).at[slot_X].set(flat_X[order_X] % E_l, mode="drop")
    recv_x = _all_to_all(send_x.reshape(ep, C, D), ep_axes).reshape(ep * C, D)
    recv_id = _all_to_all(send_id.reshape(ep, C), ep_axes).reshape(ep * C, 1)
    g_X = weights_MA.reshape(-1)[order_X].astype(jnp.float32)
    if c.weight_before_down:  # the weight travels with its row and is applied on the expert shard
        send_g = jnp.zeros((ep * C,), jnp.float32).at[slot_X].set(g_X, mode="drop")
        recv_g, g_X = _all_to_all(send_g.reshape(ep, C), ep_axes).reshape(ep * C, 1), jnp.ones_like(g_X)
    else:
        recv_g = jnp.ones((ep * C, 1), jnp.float32)
    y_CD = _psum(_experts(c, recv_x, recv_id, recv_g, w, ax.quant_sim), ax.hidden)
    back_XD = jnp.take(_all_to_all(y_CD.reshape(ep, C, D), ep_axes).reshape(ep * C, D), slot_X, axis=0,
                       mode="fill", fill_value=0)
    g_X = jnp.where(keep_X, g_X, 0.0)
    y_MD = jnp.zeros((M, D), jnp.float32).at[token_X].add(back_XD * g_X[:, None])
    dropped = jnp.sum(~keep_X & mask_M[token_X]).astype(jnp.int32)
    return y_MD, dropped


def _ragged_a2a(c, x_MD, experts_MA, weights_MA, mask_M, w, ax):
    if not ax.experts:  # one expert shard (no mesh, or experts not split): nothing to exchange
        return _psum(_experts(c, x_MD, experts_MA, weights_MA, w, ax.quant_sim), ax.hidden), jnp.int32(0)
    ragged = _ragged_all_to_all_reference if c.dispatch == "ragged_a2a_emulated" else _ragged_all_to_all
    ep_axes, E_l, (M, A) = ax.experts, w[0].shape[0], experts_MA.shape
    ep, X, D, me = ax.ep, M * A, x_MD.shape[1], _rank(ep_axes)
    flat_X = experts_MA.reshape(-1)
    order_X = jnp.argsort(flat_X, stable=True)  # by expert, hence by destination shard
    token_X = order_X // A
    count_E = jnp.bincount(flat_X, length=ep * E_l)
    all_count_SE = jax.lax.all_gather(count_E, _axis(ep_axes), axis=0)  # [ep src, E]
    size_SD = all_count_SE.reshape(ep, ep, E_l).sum(-1)  # rows shard s sends to shard d
    send_D, recv_S = size_SD[me], size_SD[:, me]
    in_off_D = jnp.cumsum(send_D) - send_D
    out_off_D = (jnp.cumsum(size_SD, axis=0) - size_SD)[me]  # my chunk's place in shard d's buffer
    recv_off_S = jnp.cumsum(recv_S) - recv_S
    rows = ep * X  # worst case: every pair of every shard routes here
    x_XD = jnp.take(x_MD, token_X, axis=0)
    recv_x = ragged(x_XD, jnp.zeros((rows, D), x_MD.dtype), in_off_D, send_D, out_off_D, recv_S, ep_axes)
    # received rows: source-major, sorted by local expert within each source's chunk
    local_count_SE = jax.lax.dynamic_slice_in_dim(all_count_SE, me * E_l, E_l, axis=1)
    ends = jnp.cumsum(local_count_SE.reshape(-1))  # [ep·E_l] chunk ends in source-major order
    chunk = jnp.searchsorted(ends, jnp.arange(rows), side="right")
    recv_id = jnp.where(chunk < ep * E_l, chunk % E_l, -1).reshape(rows, 1)
    g_X = weights_MA.reshape(-1)[order_X].astype(jnp.float32)
    if c.weight_before_down:  # the weight travels with its row and is applied on the expert shard
        recv_g = ragged(g_X[:, None], jnp.zeros((rows, 1), jnp.float32), in_off_D, send_D, out_off_D,
                        recv_S, ep_axes)
        g_X = jnp.ones_like(g_X)
    else:
        recv_g = jnp.ones((rows, 1), jnp.float32)
    y_RD = _psum(_experts(c, recv_x, recv_id, recv_g, w, ax.quant_sim), ax.hidden)
    back_XD = ragged(y_RD, jnp.zeros((X, D), jnp.float32), recv_off_S, recv_S,
                     (jnp.cumsum(size_SD, axis=1) - size_SD)[:, me], send_D, ep_axes)
    return jnp.zeros((M, D), jnp.float32).at[token_X].add(back_XD * g_X[:, None]), jnp.int32(0)


def _gshard(c, x_MD, experts_MA, weights_MA, mask_M, w, ax):
    ep_axes, (M, A), D = ax.experts, experts_MA.shape, x_MD.shape[1]
    ep, E_l = ax.ep, w[0].shape[0]
    E = ep * E_l
    C = _capacity(c.capacity_factor, M * A / E, M)
    onehot_XE = jax.nn.one_hot(experts_MA.reshape(-1), E, dtype=jnp.int32)  # token-major pair order
    pos_XE = jnp.cumsum(onehot_XE, axis=0) * onehot_XE - 1  # slot in the expert's buffer, -1 if not routed
    keep_XE = (pos_XE >= 0) & (pos_XE < C)
    slot_XEC = jax.nn.one_hot(jnp.where(keep_XE, pos_XE, -1), C, dtype=jnp.float32)
    dispatch_MEC = slot_XEC.reshape(M, A, E, C).sum(1)
    combine_MEC = (slot_XEC * weights_MA.reshape(-1)[:, None, None]).reshape(M, A, E, C).sum(1)
    x_ECD = jnp.einsum("MEC,MD->ECD", dispatch_MEC.astype(x_MD.dtype), x_MD)
    x_SECD = _all_to_all(x_ECD.reshape(ep, E_l, C, D), ep_axes)  # S: source shard
    w_gate, w_up, w_down = w
    gate_SECF, up_SECF = (jnp.einsum("SECD,EDF->SECF", x_SECD, w_) for w_ in (w_gate, w_up))
    h_SECF = swiglu_act(gate_SECF, up_SECF, c.swiglu_limit)
    if c.weight_before_down:  # each slot's weight (a slot holds at most one pair) goes to the expert shard
        g_SEC = _all_to_all(combine_MEC.sum(0).reshape(ep, E_l, C), ep_axes)
        h_SECF = (h_SECF.astype(jnp.float32) * g_SEC[..., None]).astype(h_SECF.dtype)
        combine_MEC = dispatch_MEC
    h_SECF = sim_act(h_SECF, ax.quant_sim)
    y_SECD = _psum(jnp.einsum("SECF,EFD->SECD", h_SECF, w_down, preferred_element_type=jnp.float32), ax.hidden)
    y_ECD = _all_to_all(y_SECD, ep_axes).reshape(E, C, D)
    y_MD = jnp.einsum("MEC,ECD->MD", combine_MEC, y_ECD)
    routed_X = mask_M.repeat(A)
    dropped = jnp.sum(routed_X & ~keep_XE.any(-1)).astype(jnp.int32)
    return y_MD, dropped


STRATEGIES = {"ring": _ring, "a2a": _a2a, "ragged_a2a": _ragged_a2a, "ragged_a2a_emulated": _ragged_a2a,
              "dense": _gshard}


def _per_shard(c: MoEConfig, ax: "_Shards", x_BTD, experts_BTA, weights_BTA, mask_BT, *w):
    B, T, D = x_BTD.shape
    args = (x_BTD.reshape(B * T, D), experts_BTA.reshape(B * T, -1), weights_BTA.reshape(B * T, -1),
            mask_BT.reshape(B * T))
    if ax.replicated_tokens:  # every shard holds every token: local experts, then sum the parts
        ids = _local_ids(args[1], _rank(ax.experts), w[0].shape[0])
        y_MD = _experts(c, args[0], ids, args[2], w, ax.quant_sim)
        y_MD, dropped = _psum(_psum(y_MD, ax.hidden), ax.experts), jnp.int32(0)
    else:
        y_MD, dropped = STRATEGIES[c.dispatch](c, *args, w, ax)
    return y_MD.astype(x_BTD.dtype).reshape(B, T, D), _psum(dropped, ax.tokens)


def dispatch_experts(c: MoEConfig, x_BTD, experts_BTA, weights_BTA, mask_BT, w_gate_EDF, w_up_EDF, w_down_EFD,
                     quant_sim: str = "none"):
    """Routed-expert output [B, T, D] and the (token, expert) pairs dropped for capacity (int32)."""
    axes: MoEAxes = moe_axes()
    if axes.mesh is None:
        ax = _Shards((), (), (), 1, False, quant_sim)
        return _per_shard(c, ax, x_BTD, experts_BTA, weights_BTA, mask_BT, w_gate_EDF, w_up_EDF, w_down_EFD)
    size = lambda names: math.prod(axes.mesh.shape[a] for a in names)  # noqa: E731
    batch, seq = axes.tokens
    batch = batch if x_BTD.shape[0] % size(batch) == 0 else ()  # e.g. init's [1, 8]: tokens stay whole
    seq = seq if x_BTD.shape[1] % size(seq) == 0 else ()
    token_axes = batch + seq
    expert = axes.expert
    if set(expert) & set(token_axes) and not set(expert) <= set(token_axes):
        raise DispatchError(f"the experts' mesh axes {expert} must all split the tokens ({token_axes}) or none")
    hidden = tuple(a for a in axes.hidden if a not in token_axes and a not in expert)
    ep = size(expert)
    E = w_gate_EDF.shape[0]
    if E % ep:
        raise DispatchError(f"moe.n_routed_experts={E} is not divisible by the {ep} expert shards {expert}")
    ax = _Shards(expert, hidden, token_axes, ep, bool(expert) and not set(expert) <= set(token_axes), quant_sim)
    t = P(batch or None, seq or None)
    e, h = expert or None, hidden or None
    fn = jax.shard_map(
        partial(_per_shard, c, ax), mesh=axes.mesh,
        in_specs=(P(*t, None), P(*t, None), P(*t, None), t, P(e, None, h), P(e, None, h), P(e, h, None)),
        out_specs=(P(*t, None), P()),
    )
    return fn(x_BTD, experts_BTA, weights_BTA, mask_BT, w_gate_EDF, w_up_EDF, w_down_EFD)
