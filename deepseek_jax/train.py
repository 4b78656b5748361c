"""The train state and the pure, jitted train and eval steps.

    loss = CE(next token) + λ · mean_k CE_k(MTP depth k) + α · Σ_layers L_bal + λ_I · Σ_layers L_I
           (V4.1: DSpark's draft slots take the MTP depths' place, plus λ·c·BCE of its confidence; losses.py)
    params <- optimizer(grads)                         (AdamW | Muon + AdamW, clipped)
    b_e    <- b_e + γ · sign(mean load - load_e)       (router biases, outside the optimizer)
    b_vl_e <- b_vl_e + γ · sign(mean load_vl - load_vl_e)   (V4.1's bias_vl: loads of media-span tokens)

L_I is DeepSeek-V3.2's indexer KL (layers/attention/indexer.py), one per DSA block (MTP blocks included). In the
sparse stage each indexer's inputs are detached, so L_I trains only the indexers and the LM loss
only the rest; in the dense warm-up (`index.index_dense_warmup`) the optimizer freezes everything
but the indexers (optim.indexer_only) and the router biases stay put.

Expert loads are the counts over the whole global batch (the step sees global arrays, so under a
mesh the sum is a cross-device reduction, never a per-shard statistic). Each bias has its own
modality's load: `bias` the real tokens that selected with it, `bias_vl` (moe.vl_bias) those inside
media spans; a batch without span tokens leaves `bias_vl` bit for bit (sign 0). A non-finite loss or
gradient never reaches the state: the update is skipped, and unless `skip_nonfinite_steps` is set the
step is recorded in `bad_step` and the loop stops with an error naming it. A non-finite updated state
(parameters, router biases, optimizer state: a finite gradient times a huge learning rate overflows) is
recorded in `bad_step` too, but not undone: selecting on it made XLA:CPU compile the step 7x slower
(76 s vs 11 s, tiny V4), so the loop stops on it before any save, and a save refuses it (checkpoint.py).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from deepseek_jax import losses
from deepseek_jax.config import Config
from deepseek_jax.layers.moe.balance import update_router_bias
from deepseek_jax.media.slots import media_from_batch
from deepseek_jax.models import BiasRows, router_bias_rows
from deepseek_jax.models.common import has_index_loss
from deepseek_jax.sharding import batch_shards


@struct.dataclass
class TrainState:
    step: jax.Array  # int32, optimizer steps taken
    params: Any  # trained by the optimizer
    router: Any  # aux-loss-free selection biases, updated from expert counts
    opt_state: Any
    rng: jax.Array  # uint32 key data (checkpointable), for anything stochastic
    bad_step: jax.Array  # int32, first step with a non-finite loss, gradient or update; -1 if none


def _loss_terms(params, router, batch, model: nn.Module, cfg: Config, index_loss: bool = True):
    """Per-term losses and the routing counts {"main", "mtp", "dspark"} (text: the tokens that selected
    with `bias`) and {"main_vl", "mtp_vl", "dspark_vl"} (media-span tokens, `bias_vl`), None where the
    model has no such routing, for one batch (the indexer KL only if index_loss and the model has DSA
    blocks)."""
    tcfg, mcfg = cfg.train, cfg.model
    out = model.apply(
        {"params": params, "router": router}, batch["tokens"],
        None if mcfg.row_positions else batch["positions"], batch["segment_ids"],
        return_logits=False, index_loss=index_loss and has_index_loss(mcfg) and tcfg.index_loss_weight > 0,
        engram_rows=batch.get("engram_rows"),  # host-hashed Engram rows (data/pipeline.py); None without
        media=media_from_batch(batch),  # images / video / audio of the batch (media/slots.py); None for text
    )  # fmt: skip
    B, T, D = out.hidden.shape
    w_head_DV = params["w_head"].astype(out.hidden.dtype)
    per_device = tcfg.loss_chunk_tokens or losses.auto_chunk_tokens(mcfg.vocab_size, batch_shards())
    chunk = per_device * batch_shards()  # global tokens per chunk

    def cross_entropy(hidden_BTD, k):  # (Σ NLL, tokens) of the targets k positions ahead
        targets, mask = losses.next_token_targets(batch["tokens"], batch["loss_mask"], k)
        return losses.chunked_cross_entropy(
            hidden_BTD.reshape(B * T, D), w_head_DV, targets.reshape(-1), mask.reshape(-1), chunk
        )

    ce_sum, n_tok = cross_entropy(out.hidden, 1)
    terms = {"ce": ce_sum / jnp.maximum(n_tok, 1), "tokens": n_tok}
    mtp = out.mtp
    mtp_losses = [s / jnp.maximum(n, 1) for s, n in
                  (cross_entropy(h, k + 2) for k, h in enumerate([] if mtp is None else mtp.hidden))]
    terms["mtp"] = jnp.mean(jnp.stack(mtp_losses)) if mtp_losses else jnp.float32(0)
    ds = out.dspark  # V4.1: DSpark drafts take MTP's place (losses.dspark_losses; ours, the release has none)
    if ds is not None:
        w_markov_YV = params["dspark"]["markov_head"].astype(out.hidden.dtype)
        terms["mtp"], terms["confidence"] = losses.dspark_losses(
            ds.hidden, ds.markov, ds.confidence, w_head_DV, w_markov_YV, batch["tokens"], batch["loss_mask"], chunk)
    routing = [r for r in (out.routing, None if mtp is None else mtp.routing, None if ds is None else ds.routing)
               if r is not None]
    terms["balance"] = sum(r.balance_loss.sum() for r in routing) if routing else jnp.float32(0)
    index = [kl.sum() for kl in (out.index_loss, None if mtp is None else mtp.index_loss) if kl is not None]
    terms["index"] = sum(index) if index else jnp.float32(0)
    routed = sum(r.counts.sum() + r.counts_vl.sum() for r in routing)
    dropped = sum(r.dropped.sum() for r in routing)
    # share of real (token, expert) pairs a capacity-limited dispatch dropped (0 when dropless)
    terms["dropped_frac"] = dropped / jnp.maximum(routed, 1) if routing else jnp.float32(0)
    counts = {}
    for name, r in (("main", out.routing), ("mtp", None if mtp is None else mtp.routing),
                    ("dspark", None if ds is None else ds.routing)):
        counts[name], counts[name + "_vl"] = (None, None) if r is None else (r.counts, r.counts_vl)
    return terms, counts


def loss_fn(params, router, batch, model: nn.Module, cfg: Config):
    terms, counts = _loss_terms(params, router, batch, model, cfg)
    t = cfg.train
    total = terms["ce"] + t.mtp_loss_weight * terms["mtp"] + t.balance_loss_weight * terms["balance"]
    total = total + t.index_loss_weight * terms["index"]
    if "confidence" in terms:  # DSpark's confidence head, next to its drafts' cross-entropy
        total = total + t.mtp_loss_weight * losses.DSPARK_CONFIDENCE_WEIGHT * terms["confidence"]
    return total, (terms, counts)


def update_biases(router: dict, counts: dict, rate: float, bias_rows: list[BiasRows]) -> dict:
    """The aux-loss-free rule on every learned-routing bias the registry lists (MTP / DSpark included):
    each takes its rows of its source's counts (`bias_vl` those of the media-span tokens)."""
    router = jax.tree.map(lambda x: x, router)  # a copy we may rebind into
    for path, source, rows in bias_rows:
        node = functools.reduce(dict.__getitem__, path[:-1], router)
        node[path[-1]] = update_router_bias(node[path[-1]], counts[source][jnp.asarray(rows)], rate)
    return router


def _load_stats(counts_LE):
    """max/mean expert load per layer [L] (1 = perfectly balanced)."""
    counts_LE = counts_LE.astype(jnp.float32)
    return counts_LE.max(-1) / jnp.maximum(counts_LE.mean(-1), 1e-9)


def all_finite(tree) -> jax.Array:
    """True iff every floating-point leaf of `tree` is finite (one reduction per leaf)."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.bool_(True)


def train_step(state: TrainState, batch: dict, *, model, optimizer, schedule, cfg: Config):
    """One optimizer step; pure (jit it with donate_argnums=0)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (terms, counts)), grads = grad_fn(state.params, state.router, batch, model, cfg)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    index = cfg.model.index
    frozen = index is not None and index.index_dense_warmup  # dense warm-up: only the indexers train
    rate = 0.0 if frozen else cfg.train.bias_update_rate
    bias_rows = router_bias_rows(cfg.model)
    router = update_biases(state.router, counts, rate, bias_rows)

    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    step_ok = finite & all_finite((params, router, opt_state))
    if not cfg.train.skip_nonfinite_steps:
        finite = finite & (state.bad_step < 0)  # after a bad step the state stays at the last good one
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        router=keep(router, state.router),
        opt_state=keep(opt_state, state.opt_state),
        bad_step=jnp.where((state.bad_step < 0) & ~step_ok, state.step, state.bad_step),
    )
    metrics = {
        "loss": terms["ce"], "total_loss": total, "mtp_loss": terms["mtp"], "balance_loss": terms["balance"],
        "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": terms["tokens"],
        "skipped": (~finite).astype(jnp.int32), "moe_dropped_frac": terms["dropped_frac"],
    }
    if has_index_loss(cfg.model) and cfg.train.index_loss_weight > 0:
        metrics["index_loss"] = terms["index"]  # Σ over DSA / V4 CSA layers of the mean per-token KL
    if "confidence" in terms:
        metrics["dspark_confidence_loss"] = terms["confidence"]
    if counts["main"] is not None:
        metrics["load_max_over_mean"] = _load_stats(counts["main"] + counts["main_vl"])  # [L_moe], every token
        metrics.update(_bias_range(new_state.router, bias_rows))
    return new_state, metrics


def _bias_range(router, bias_rows: list[BiasRows]) -> dict:
    """bias_min / bias_max over every `bias` (0 without one), and bias_vl_min / _max where there are bias_vl."""
    out = {}
    for name in ("bias", "bias_vl"):
        biases = [functools.reduce(dict.__getitem__, r.path, router) for r in bias_rows if r.path[-1] == name]
        if biases or name == "bias":
            biases = biases or [jnp.zeros(())]
            out[f"{name}_min"] = jnp.min(jnp.stack([b.min() for b in biases]))
            out[f"{name}_max"] = jnp.max(jnp.stack([b.max() for b in biases]))
    return out


def eval_step(params, router, batch, *, model, cfg: Config):
    """Summed next-token (and MTP) losses and token counts over one batch."""
    terms, _ = _loss_terms(params, router, batch, model, cfg, index_loss=False)
    return {"ce_sum": terms["ce"] * terms["tokens"], "tokens": terms["tokens"], "mtp": terms["mtp"]}

