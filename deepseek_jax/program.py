"""The program a config describes: model, optimizer, steps and sharded abstract state, built once.

`build_program(cfg, mesh, mesh_rules)` allocates nothing (`eval_shape` only) and works on a concrete
mesh or an abstract one (planning without devices). The loop (run.py), `plan` and the benchmarks
all start from it; each jits the steps as it needs (the loop in lockstep across processes, `plan`
with explicit in/out shardings).

    abstract state   TrainState of ShapeDtypeStructs      (params f32, router, optimizer state, ...)
    state shardings  TrainState of NamedShardings          (logical axes -> mesh axes by the rules)
    batch            [B, T] int32/float32 arrays, B split over the `act_batch` rule's mesh axes
                     (+ engram_rows [B, T, L_engram, U] int32 for a model with Engram; + the per-row media
                     arrays of data.media, [B, ...] each, B split the same way: media/slots.py BATCH_KEYS)
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from deepseek_jax.config import Config
from deepseek_jax.models import build_model, init_inputs
from deepseek_jax.optim import indexer_only, lr_schedule, make_optimizer
from deepseek_jax.sharding import activate, batch_sharding, logical_shardings, replicated
from deepseek_jax.train import TrainState, eval_step, train_step

BATCH_DTYPES = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32, "loss_mask": jnp.float32}


@dataclass(frozen=True)
class Program:
    """Everything a config's training needs besides data and state; nothing in it is allocated."""

    cfg: Config
    mesh: object  # jax.sharding.Mesh, or AbstractMesh for lowering without devices
    rules: tuple  # ordered (logical name, mesh axes) pairs
    model: nn.Module
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule  # the learning rate per step (logged by the train step)
    train_step: Callable  # (state, batch) -> (state, metrics); pure, un-jitted, donate the state
    eval_step: Callable  # (params, router, batch) -> {"ce_sum", "tokens", "mtp"}; pure, un-jitted
    abstract_state: TrainState  # of ShapeDtypeStructs
    state_shardings: TrainState  # of NamedShardings
    batch_sharding: NamedSharding

    def activate(self) -> contextlib.AbstractContextManager:
        """The context the model must be traced in: the mesh (concrete or abstract) and the rules."""
        return activate(self.mesh, self.rules)

    def state_target(self) -> TrainState:
        """The abstract state carrying its shardings (a restore target, or a lowering input)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def batch_specs(self) -> dict:
        """One global batch [B, T] as ShapeDtypeStructs in the batch sharding (with Engram also its
        host-hashed `engram_rows` [B, T, L_engram, U] int32; with data.media the media arrays [B, ...],
        whose leading B is split like the tokens' by the same sharding)."""
        B, T = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        specs = {k: jax.ShapeDtypeStruct((B, T), dt, sharding=self.batch_sharding) for k, dt in BATCH_DTYPES.items()}
        if self.cfg.data.media is not None:  # per-row media arrays (a padding row gives their shapes)
            from deepseek_jax.data.media_pack import media_row  # lazy: only media runs need the host pipeline

            for k, v in media_row(self.cfg.data, self.cfg.model).items():
                specs.setdefault(k, jax.ShapeDtypeStruct((B, *v.shape), v.dtype, sharding=self.batch_sharding))
        if (engram := self.cfg.model.engram) is not None:
            specs["engram_rows"] = jax.ShapeDtypeStruct((B, T, *engram.rows_shape), jnp.int32,
                                                        sharding=self.batch_sharding)
        return specs

    def lower(self) -> jax.stages.Lowered:
        """The jitted, state-donating train step lowered on abstract inputs (nothing allocated)."""
        jitted = jax.jit(self.train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                         out_shardings=(self.state_shardings, None), donate_argnums=0)
        with self.activate():
            traced = jitted.trace(self.state_target(), self.batch_specs())
        if isinstance(self.mesh, jax.sharding.AbstractMesh):  # no device says which backend to lower for
            return traced.lower(lowering_platforms=(jax.default_backend(),))
        return traced.lower()

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shardings (no host-side copy of the parameters)."""
        model, optimizer = self.model, self.optimizer
        tokens, kw = init_inputs(self.cfg.model, min(8, self.cfg.data.seq_len))

        def init(seed):
            init_key, state_key = jax.random.split(jax.random.key(seed))
            variables = nn.unbox(model.init(init_key, tokens, mutable=["params", "router"], **kw))
            return TrainState(
                step=jnp.int32(0), params=variables["params"], router=variables["router"],
                opt_state=optimizer.init(variables["params"]), rng=jax.random.key_data(state_key),
                bad_step=jnp.int32(-1),
            )

        return jax.jit(init, out_shardings=self.state_shardings)(self.cfg.train.seed)

    def state_from(self, params, router) -> TrainState:
        """A fresh state around given parameters (a converted checkpoint): step 0, a new optimizer state,
        the rng `init_state` would draw; no random parameters are made, and the inputs are donated."""
        optimizer = self.optimizer

        def build(params, router, seed):
            _, state_key = jax.random.split(jax.random.key(seed))
            return TrainState(
                step=jnp.int32(0), params=params, router=router, opt_state=optimizer.init(params),
                rng=jax.random.key_data(state_key), bad_step=jnp.int32(-1),
            )

        return jax.jit(build, out_shardings=self.state_shardings, donate_argnums=(0, 1))(
            params, router, self.cfg.train.seed)


def build_program(cfg: Config, mesh, mesh_rules) -> Program:
    """The Program of `cfg` on `mesh` (concrete or abstract) under `mesh_rules`; nothing is allocated."""
    model = build_model(cfg.model)
    tokens, kw = init_inputs(cfg.model, 8)
    boxed = jax.eval_shape(partial(model.init, mutable=["params", "router"], **kw), jax.random.key(0), tokens)
    params, index = nn.unbox(boxed)["params"], cfg.model.index
    trainable = indexer_only(params) if index is not None and index.index_dense_warmup else None
    optimizer = make_optimizer(cfg.optim, params, cfg.train.steps, trainable, engram=cfg.model.engram)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    abstract, shardings = state_shardings(boxed, optimizer, mesh, mesh_rules)
    return Program(
        cfg=cfg, mesh=mesh, rules=tuple(mesh_rules), model=model, optimizer=optimizer, schedule=schedule,
        train_step=partial(train_step, model=model, optimizer=optimizer, schedule=schedule, cfg=cfg),
        eval_step=partial(eval_step, model=model, cfg=cfg),
        abstract_state=abstract, state_shardings=shardings, batch_sharding=batch_sharding(mesh, mesh_rules),
    )


def state_shardings(boxed, optimizer, mesh, mesh_rules) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, its NamedShardings) from the boxed abstract variables' logical axes."""
    boxed = {"router": {}, **boxed}  # a model without MoE layers has no router collection
    param_sh = logical_shardings(boxed["params"], mesh, mesh_rules)
    router_sh = logical_shardings(boxed["router"], mesh, mesh_rules)
    params = nn.unbox(boxed["params"])
    opt_abs = jax.eval_shape(optimizer.init, params)
    rep = replicated(mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (frozen leaves: no state)
    opt_sh = optax.tree_map_params(optimizer, lambda p, s: p if masked(p) else s, opt_abs, param_sh,
                                   transform_non_params=lambda _: rep, is_leaf=masked)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, router=nn.unbox(boxed["router"]),
        opt_state=opt_abs, rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        bad_step=jax.ShapeDtypeStruct((), jnp.int32),
    )
    shardings = TrainState(step=rep, params=param_sh, router=router_sh, opt_state=opt_sh, rng=rep, bad_step=rep)
    return abstract, shardings
