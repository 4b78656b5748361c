"""`deepseek-jax inspect`: a model's parameter table and one forward pass, or its abstract shapes.

The parameter bytes come from `jax.eval_shape` of the model's init (nothing allocated). A model
whose parameters and outputs fit in a quarter of the forward's memory (host RAM on CPU, the
device's memory limit on an accelerator) is initialised and run once, jitted and timed; a larger one
(every full-size config on a workstation) gets an abstract forward, `jax.eval_shape` of apply: the
output shapes and dtypes, with a line saying why the concrete pass was skipped.
"""

import os
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.models import build_model, init_inputs
from deepseek_jax.params import param_summary

MEMORY_FRACTION = (
    0.25  # the concrete forward runs when parameters + outputs fit in this much memory
)


class InputError(ValueError):
    """Inputs the model or a command cannot take (token ids, shapes, sampling or command-line arguments);
    the message names them."""


def check_tokens(tokens_BT: np.ndarray, cfg: ModelConfig) -> None:
    """Host-side validation: inside jit an out-of-range id would be clamped silently."""
    tokens_BT = np.asarray(tokens_BT)
    if tokens_BT.ndim != 2 or not np.issubdtype(tokens_BT.dtype, np.integer):
        raise InputError(
            f"tokens must be an integer array [batch, seq], got {tokens_BT.dtype} {tokens_BT.shape}"
        )
    if tokens_BT.shape[1] > cfg.max_seq_len:
        raise InputError(
            f"sequence length {tokens_BT.shape[1]} exceeds model.max_seq_len={cfg.max_seq_len}"
        )
    bad = (tokens_BT < 0) | (tokens_BT >= cfg.vocab_size)
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise InputError(
            f"token id {int(tokens_BT[b, t])} at [{b}, {t}] is outside "
            f"[0, vocab_size={cfg.vocab_size})"
        )


def memory_budget(device: jax.Device | None = None) -> tuple[int, str]:
    """Bytes the forward may use (MEMORY_FRACTION of the device's memory), and where from."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        total, where = int(stats["bytes_limit"]), f"{device.platform} device memory"
    else:
        total, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"
    return int(total * MEMORY_FRACTION), f"{MEMORY_FRACTION:g} of {_gib(total)} {where}"


def output_rows(out) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, dtype) of every array in a model output (None fields left out)."""
    return [
        (_path(path), tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_leaves_with_path(out)
    ]


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def inspect(
    cfg: ModelConfig,
    batch: int = 2,
    seq_len: int = 64,
    seed: int = 0,
    budget_bytes: int | None = None,
) -> dict:
    """Prints the parameter table, then a concrete forward if it fits `budget_bytes` (default:
    memory_budget()), else an abstract one. Returns {"abstract", "param_bytes", "outputs"} plus
    "logits" and "loss" when the forward ran."""
    print(param_summary(cfg))
    model = build_model(cfg)
    tokens_BT = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))
    check_tokens(tokens_BT, cfg)
    tokens_spec = jax.ShapeDtypeStruct(tokens_BT.shape, jnp.int32)
    kw = engram_inputs(cfg, tokens_BT.shape, seed)
    init_tokens, init_kw = init_inputs(cfg, seq_len)  # with a dummy of each media front-end: all its parameters
    variables = nn.unbox(jax.eval_shape(partial(model.init, **init_kw), jax.random.key(seed), init_tokens))
    out = jax.eval_shape(partial(model.apply, **kw), variables, tokens_spec)
    param_bytes, out_bytes = _nbytes(variables), _nbytes(out)
    where = "a budget given by the caller"
    if budget_bytes is None:
        budget_bytes, where = memory_budget()
    print(
        f"\nparameters {_gib(param_bytes)} + outputs {_gib(out_bytes)}; forward budget "
        f"{_gib(budget_bytes)} ({where})"
    )
    result = {"param_bytes": param_bytes, "outputs": output_rows(out)}
    if param_bytes + out_bytes > budget_bytes:
        print(f"\nabstract forward on {batch}x{seq_len} tokens (jax.eval_shape of apply):")
        _print_outputs(result["outputs"])
        print(
            "concrete forward skipped: parameters + outputs exceed the budget above "
            "(initialising them would not fit comfortably)"
        )
        return {**result, "abstract": True}
    return {**result, **_run_forward(model, cfg, tokens_BT, seed), "abstract": False}


def engram_inputs(cfg: ModelConfig, shape: tuple[int, int], seed: int) -> dict:
    """Random Engram row ids [B, T, L, K] inside each layer's table (a smoke input: no hashing)."""
    if cfg.engram is None:
        return {}
    rng = np.random.default_rng(seed)
    e = cfg.engram
    rows = np.stack([rng.integers(0, n, (*shape, e.n_columns)) for n in e.num_embeddings], axis=2)
    return {"engram_rows": jnp.asarray(rows, jnp.int32)}


def _print_outputs(rows) -> None:
    for name, shape, dtype in rows:
        print(f"  {name:<28}{shape!s:<28}{dtype}")


def _run_forward(model, cfg: ModelConfig, tokens_BT: np.ndarray, seed: int) -> dict:
    """Initialises the parameters, runs one jitted forward twice (compile, then steady state)."""
    t0 = time.perf_counter()
    kw = engram_inputs(cfg, tokens_BT.shape, seed)
    init_tokens, init_kw = init_inputs(cfg, tokens_BT.shape[1])
    variables = nn.unbox(jax.jit(partial(model.init, **init_kw))(jax.random.key(seed), init_tokens))
    jax.block_until_ready(variables)
    t_init = time.perf_counter() - t0
    forward = jax.jit(partial(model.apply, **kw))
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(variables, jnp.asarray(tokens_BT)))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(variables, jnp.asarray(tokens_BT)))
    t_step = time.perf_counter() - t0
    logits = np.asarray(out.logits)
    nll = -np.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens_BT[:, 1:, None], -1).mean()
    batch, seq_len = tokens_BT.shape
    print(f"\nforward on {batch}x{seq_len} random tokens ({jax.devices()[0].platform}):")
    _print_outputs(output_rows(out))
    print(f"  logits finite: {bool(np.isfinite(logits).all())}")
    print(f"  next-token loss {nll:.3f} (uniform would be ln V = {np.log(cfg.vocab_size):.3f})")
    counts = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(out)  # main model's, [L_moe, E]
        if _path(path).endswith("counts") and not _path(path).startswith("mtp")
    ]
    if counts:
        print(f"  tokens per expert, MoE layer 0: {np.asarray(counts[0])[0].tolist()}")
    print(
        f"  init {t_init:.1f}s, first forward (compile) {t_first:.1f}s, "
        f"next forward {t_step * 1e3:.1f}ms"
    )
    return {"logits": logits, "loss": float(nll)}
