"""The train state and the pure, jitted train and eval steps.

    loss = CE(next token) + λ · mean_k CE_k(MTP depth k) + α · Σ_layers L_bal + λ_I · Σ_layers L_I
    params <- optimizer(grads)                         (AdamW | Muon + AdamW, clipped)
    b_e    <- b_e + γ · sign(mean load - load_e)       (router biases, outside the optimizer)

L_I is DeepSeek-V3.2's indexer KL (layers/dsa.py), one per DSA block (MTP blocks included). In the
sparse stage each indexer's inputs are detached, so L_I trains only the indexers and the LM loss
only the rest; in the dense warm-up (`index.index_dense_warmup`) the optimizer freezes everything
but the indexers (optim.indexer_only) and the router biases stay put.

Expert loads are the counts over the whole global batch (the step sees global arrays, so under a
mesh the sum is a cross-device reduction, never a per-shard statistic). A non-finite loss or
gradient never reaches the state: the update is skipped, and unless `skip_nonfinite_steps` is set
the step is recorded in `bad_step` and the loop stops with an error naming it.
"""

import functools
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from deepseek_jax import losses
from deepseek_jax.config import Config
from deepseek_jax.model import Transformer, build_model, router_bias_rows
from deepseek_jax.optim import indexer_only, lr_schedule, make_optimizer
from deepseek_jax.sharding import batch_shards, logical_shardings, replicated


@struct.dataclass
class TrainState:
    step: jax.Array  # int32, optimizer steps taken
    params: Any  # trained by the optimizer
    router: Any  # aux-loss-free selection biases, updated from expert counts
    opt_state: Any
    rng: jax.Array  # uint32 key data (checkpointable), for anything stochastic
    bad_step: jax.Array  # int32, first step with a non-finite loss or gradient; -1 if none


def _loss_terms(params, router, batch, model: Transformer, cfg: Config, index_loss: bool = True):
    """Per-term losses and MoE statistics for one batch (the indexer KL only if index_loss)."""
    tcfg, mcfg = cfg.train, cfg.model
    dsa = {"index_loss": True} if mcfg.index is not None and index_loss else {}
    out = model.apply(
        {"params": params, "router": router}, batch["tokens"], batch["positions"], batch["segment_ids"],
        return_logits=False, **dsa,
    )
    B, T, D = out.hidden.shape
    w_head_DV = params["w_head"].astype(out.hidden.dtype)
    chunk = tcfg.loss_chunk_tokens * batch_shards()  # per device -> global tokens per chunk
    targets, mask = losses.next_token_targets(batch["tokens"], batch["loss_mask"], 1)
    ce_sum, n_tok = losses.chunked_cross_entropy(
        out.hidden.reshape(B * T, D), w_head_DV, targets.reshape(-1), mask.reshape(-1), chunk
    )
    terms = {"ce": ce_sum / jnp.maximum(n_tok, 1), "tokens": n_tok}
    mtp_losses = []
    for k in range(mcfg.num_nextn_predict_layers):
        targets, mask = losses.next_token_targets(batch["tokens"], batch["loss_mask"], k + 2)
        s, n = losses.chunked_cross_entropy(
            out.mtp_hidden[k].reshape(B * T, D), w_head_DV, targets.reshape(-1), mask.reshape(-1), chunk,
        )
        mtp_losses.append(s / jnp.maximum(n, 1))
    terms["mtp"] = jnp.mean(jnp.stack(mtp_losses)) if mtp_losses else jnp.float32(0)
    balance = [out.balance_loss.sum()] if out.balance_loss is not None else []
    balance += [out.mtp_balance_loss.sum()] if out.mtp_balance_loss is not None else []
    terms["balance"] = sum(balance) if balance else jnp.float32(0)
    index = [kl.sum() for kl in (out.index_loss, out.mtp_index_loss) if kl is not None]
    terms["index"] = sum(index) if index else jnp.float32(0)
    routed = [c.sum() for c in (out.expert_counts, out.mtp_expert_counts) if c is not None]
    dropped = [d.sum() for d in (out.dropped, out.mtp_dropped) if d is not None]
    # share of real (token, expert) pairs a capacity-limited dispatch dropped (0 when dropless)
    terms["dropped_frac"] = sum(dropped) / jnp.maximum(sum(routed), 1) if routed else jnp.float32(0)
    return terms, (out.expert_counts, out.mtp_expert_counts)


def loss_fn(params, router, batch, model: Transformer, cfg: Config):
    terms, counts = _loss_terms(params, router, batch, model, cfg)
    t = cfg.train
    total = terms["ce"] + t.mtp_loss_weight * terms["mtp"] + t.balance_loss_weight * terms["balance"]
    total = total + t.index_loss_weight * terms["index"]
    return total, (terms, counts)


def update_biases(router: dict, counts, mtp_counts, rate: float, bias_rows=None) -> dict:
    """The aux-loss-free rule on every MoE layer's bias: `bias_rows` (model.router_bias_rows) says
    which rows of counts [L_moe, E] each stacked bias holds (hash-routed layers have none); MTP [E]."""
    router = jax.tree.map(lambda x: x, router)  # a copy we may rebind into
    if counts is not None:
        for path, rows in bias_rows or [(("moe_layers", "ffn", "bias"), tuple(range(counts.shape[0])))]:
            node = router
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = losses.update_router_bias(node[path[-1]], counts[jnp.asarray(rows)], rate)
    for k in range(0 if mtp_counts is None else mtp_counts.shape[0]):
        bias = router[f"mtp_{k}"]["block"]["ffn"]["bias"]
        router[f"mtp_{k}"]["block"]["ffn"]["bias"] = losses.update_router_bias(bias, mtp_counts[k], rate)
    return router


def _load_stats(counts_LE):
    """max/mean expert load per layer [L] (1 = perfectly balanced)."""
    counts_LE = counts_LE.astype(jnp.float32)
    return counts_LE.max(-1) / jnp.maximum(counts_LE.mean(-1), 1e-9)


def train_step(state: TrainState, batch: dict, *, model, optimizer, schedule, cfg: Config):
    """One optimizer step; pure (jit it with donate_argnums=0)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (terms, (counts, mtp_counts))), grads = grad_fn(state.params, state.router, batch, model, cfg)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    index = cfg.model.index
    frozen = index is not None and index.index_dense_warmup  # dense warm-up: only the indexers train
    rate = 0.0 if frozen else cfg.train.bias_update_rate
    router = update_biases(state.router, counts, mtp_counts, rate, router_bias_rows(cfg.model))

    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    if not cfg.train.skip_nonfinite_steps:
        finite = finite & (state.bad_step < 0)  # after a bad step the state stays at the last good one
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        router=keep(router, state.router),
        opt_state=keep(opt_state, state.opt_state),
        bad_step=jnp.where((state.bad_step < 0) & ~jnp.isfinite(total + grad_norm), state.step, state.bad_step),
    )
    metrics = {
        "loss": terms["ce"], "total_loss": total, "mtp_loss": terms["mtp"], "balance_loss": terms["balance"],
        "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": terms["tokens"],
        "skipped": (~finite).astype(jnp.int32), "moe_dropped_frac": terms["dropped_frac"],
    }
    if index is not None:
        metrics["index_loss"] = terms["index"]  # Σ over DSA layers of the mean per-token KL
    if counts is not None:
        metrics["load_max_over_mean"] = _load_stats(counts)  # [L_moe]
        biases = [functools.reduce(dict.__getitem__, path, new_state.router)
                  for path, _ in router_bias_rows(cfg.model)] or [jnp.zeros(())]
        metrics["bias_min"] = jnp.min(jnp.stack([b.min() for b in biases]))
        metrics["bias_max"] = jnp.max(jnp.stack([b.max() for b in biases]))
    return new_state, metrics


def eval_step(params, router, batch, *, model, cfg: Config):
    """Summed next-token (and MTP) losses and token counts over one batch."""
    terms, _ = _loss_terms(params, router, batch, model, cfg, index_loss=False)
    return {"ce_sum": terms["ce"] * terms["tokens"], "tokens": terms["tokens"], "mtp": terms["mtp"]}


def state_shardings(boxed, optimizer, mesh, mesh_rules):
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


def build(cfg: Config, mesh, mesh_rules):
    """(model, optimizer, train_step with its static arguments bound, abstract state, its shardings)
    for `cfg` on `mesh` (concrete or abstract); nothing is allocated."""
    model = build_model(cfg.model)
    boxed = jax.eval_shape(partial(model.init, mutable=["params", "router"]), jax.random.key(0),
                           jnp.zeros((1, 8), jnp.int32))
    params, index = nn.unbox(boxed)["params"], cfg.model.index
    trainable = indexer_only(params) if index is not None and index.index_dense_warmup else None
    optimizer = make_optimizer(cfg.optim, params, cfg.train.steps, trainable)
    abstract, shardings = state_shardings(boxed, optimizer, mesh, mesh_rules)
    step = partial(train_step, model=model, optimizer=optimizer, schedule=lr_schedule(cfg.optim, cfg.train.steps),
                   cfg=cfg)
    return model, optimizer, step, abstract, shardings


def init_state(model, optimizer, cfg: Config, shardings) -> TrainState:
    """A fresh state, created directly in its shardings (no host-side copy of the parameters)."""
    tokens = jnp.zeros((1, min(8, cfg.data.seq_len)), jnp.int32)

    def init(seed):
        key = jax.random.key(seed)
        init_key, state_key = jax.random.split(key)
        variables = nn.unbox(model.init(init_key, tokens, mutable=["params", "router"]))
        return TrainState(
            step=jnp.int32(0), params=variables["params"], router=variables["router"],
            opt_state=optimizer.init(variables["params"]), rng=jax.random.key_data(state_key),
            bad_step=jnp.int32(-1),
        )

    return jax.jit(init, out_shardings=shardings)(cfg.train.seed)
