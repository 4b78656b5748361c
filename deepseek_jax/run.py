"""The single training / evaluation loop: restore or init, then train, evaluate, save.

Reads top to bottom. The host syncs with the device only at log, eval and save steps. SIGTERM and
SIGINT finish the current step (with several processes: the next log step), save, and return
normally. A run directory that holds a checkpoint is resumed automatically (state, data position,
step), into the new run's shardings.

Multi-process (one process per host; the CLI initialises `jax.distributed`): every process runs this
loop, and each jitted step is one program over a mesh spanning all processes' devices. Process i of
n reads documents i::n, global_batch_size / n rows per batch (`put_batch` assembles the global
batch); process 0 trains the tokenizer while the others wait; all take the same number of eval
steps; each saves and restores its own data position, and a resume under another process count
restores the state, resharded, but restarts the data stream with a warning (one process's position
cannot be split or merged). The run directory must be shared; only process 0 logs, plots, prints.
"""

import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax import data as data_lib
from deepseek_jax.checkpoint import Checkpointer, check_compatible
from deepseek_jax.config import Config, ConfigError, to_dict, to_yaml
from deepseek_jax.layers.moe.dispatch import check_backend
from deepseek_jax.metrics import MetricsLogger, plot_run
from deepseek_jax.model import Transformer
from deepseek_jax.params import train_flops_per_token
from deepseek_jax.sharding import batch_sharding, in_mesh, make_mesh, rules
from deepseek_jax.train import build, eval_step, init_state

AVERAGED = ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm", "skipped", "moe_dropped_frac")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the step."""


@dataclass
class Session:
    """Everything a run needs besides the state: built once from the config."""

    cfg: Config
    run_dir: Path
    model: Transformer
    tokenizer: object
    mesh: object
    batch_sharding: object
    train_step: object
    eval_step: object
    abstract_state: object
    state_shardings: object
    optimizer: object


def measure_peak_flops(n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of one device on a float32 n x n matmul (the MFU denominator when not configured)."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        f(x).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def open_session(cfg: Config) -> Session:
    """Tokenizer, mesh, model, optimizer and jitted steps for `cfg` (no state yet)."""
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _sync("open_session")  # the processes start together: the first barrier also sets up its channels
    tokenizer = _load_tokenizer(cfg, run_dir)
    mesh, mesh_rules = make_mesh(cfg.mesh), rules(cfg.mesh)
    _check_batch_split(batch_sharding(mesh, mesh_rules), cfg)
    check_backend(cfg.model.moe.dispatch, mesh.devices.flat[0].platform)
    model, optimizer, step, abstract, shardings = build(cfg, mesh, mesh_rules)
    ev = partial(eval_step, model=model, cfg=cfg)
    return Session(
        cfg, run_dir, model, tokenizer, mesh, batch_sharding(mesh, mesh_rules),
        in_mesh(_in_lockstep(jax.jit(step, donate_argnums=0)), mesh, mesh_rules),
        in_mesh(_in_lockstep(jax.jit(ev)), mesh, mesh_rules),
        abstract, shardings, optimizer,
    )


# Multi-process coordination. XLA:CPU's collectives (Gloo) give a process 30 s to join the *first*
# collective over a group of devices; later waits are unbounded. So barriers (one device per process)
# are first used at session start, and a jitted step runs only once every process has compiled it
# (compile times differ: on CPU only process 0 reads the persistent compilation cache).


def _sync(name: str) -> None:
    """A barrier across processes (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _in_lockstep(jitted):
    """`jitted`, compiled ahead of its first call per input layout, then run after a barrier."""
    if jax.process_count() == 1:
        return jitted
    compiled = {}

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, *((x.shape, x.dtype, x.sharding) for x in leaves))
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile()
            _sync(f"compiled #{len(compiled)}")
        return compiled[key](*args)

    return call


def _on_all_processes(fn):
    """fn() on process 0, then on the others once it has returned (e.g. written a shared file).

    An error on process 0 is raised on every process, so none waits for it forever."""
    if jax.process_count() == 1:
        return fn()
    out, error = None, None
    if jax.process_index() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, once the others are told)
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))  # also the barrier
    if error is not None:
        raise error
    if failed:
        raise TrainingError("process 0 failed (its error is in its output); stopping")
    return fn() if jax.process_index() else out


def _load_tokenizer(cfg: Config, run_dir: Path):
    """The run's tokenizer; trained at most once, by process 0, when the run directory has none."""
    return _on_all_processes(lambda: data_lib.load_tokenizer(cfg.data, run_dir, cfg.model.vocab_size))


def _check_batch_split(sharding, cfg: Config) -> None:
    """Batches split evenly over their mesh axes, and over the processes (B / n distinct rows each)."""
    B, n = cfg.data.global_batch_size, jax.process_count()
    axes = sharding.spec[0] if sharding.spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if B % shards:
        raise ConfigError(f"data.global_batch_size={B} does not split over the {shards} batch shards "
                          f"(mesh axes {list(axes)} of mesh.shape {list(cfg.mesh.shape)})")
    rows = {tuple(range(*idx[0].indices(B))) for idx in sharding.addressable_devices_indices_map((B,)).values()}
    held = len(set().union(*rows))
    if held * n != B:
        raise ConfigError(
            f"with {n} processes the mesh must split each batch of data.global_batch_size={B} rows over "
            f"the processes ({B // n} rows each), but this process's devices hold {held} rows: put the "
            f"batch's mesh axes {list(axes)} across hosts in mesh.shape {list(cfg.mesh.shape)}"
        )


def restore_or_init(s: Session, ckpt: Checkpointer):
    """(state, data-iterator state or None): the latest checkpoint if any, else a fresh state."""
    step = ckpt.latest_step()
    if step is None:
        # Traced outside the mesh: init's dummy batch has one row, which a mesh that splits the batch
        # cannot shard; out_shardings place the parameters, whose values need no mesh.
        return init_state(s.model, s.optimizer, s.cfg, s.state_shardings), None
    check_compatible(ckpt.stored_config(step), s.cfg, s.run_dir)
    target = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.abstract_state, s.state_shardings
    )
    state, data_state, _ = ckpt.restore(step, target)
    return state, data_state


def put_batch(s: Session, batch: dict) -> dict:
    """This process's rows [B / n, ...] -> global arrays [B, ...] split as `s.batch_sharding` says."""
    n = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(s.batch_sharding, v, (v.shape[0] * n, *v.shape[1:]))
        for k, v in ((k, np.asarray(v)) for k, v in batch.items())
    }


def _any_process(flag: bool) -> bool:
    """True if `flag` holds on any process (a host-side collective; free with one process)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def evaluate(s: Session, state) -> dict:
    """Held-out loss and perplexity over up to `train.eval_batches` validation batches.

    Each process reads its own validation documents, so the processes may run out of batches at
    different steps; since an eval step is collective they step together until all have run out
    (or `eval_batches` steps), one that has run out feeding an all-padding batch (no targets)."""
    cfg, n_proc = s.cfg, jax.process_count()
    it = data_lib.make_iterator(cfg.data, "validation", s.tokenizer, repeat=False, shuffle=False,
                                process_index=jax.process_index(), process_count=n_proc)
    padding = data_lib.padding_batch(cfg.data, n_proc, s.tokenizer.pad_id)
    ce_sum = tokens = mtp = 0.0
    n = 0
    while n < cfg.train.eval_batches:
        batch = next(it, None)
        if not _any_process(batch is not None):
            break
        out = s.eval_step(state.params, state.router, put_batch(s, padding if batch is None else batch))
        ce_sum, tokens, mtp = ce_sum + float(out["ce_sum"]), tokens + float(out["tokens"]), mtp + float(out["mtp"])
        n += 1
    it.close()
    if tokens == 0:
        raise data_lib.DataError(f"validation split of {s.cfg.data.source} produced no tokens")
    loss = ce_sum / tokens
    return {"loss": loss, "perplexity": float(np.exp(loss)), "mtp_loss": mtp / max(n, 1), "tokens": tokens}


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop checks it after each step.

    With several processes the stop must happen at the same step on all of them (saving is
    collective), and a signal may reach them at different steps: they agree at log steps, where the
    host syncs anyway, so a stop waits for the next one."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def agreed(self, at_sync_point: bool) -> str | None:
        """The signal to stop on now, or None; the same on every process."""
        if jax.process_count() == 1:
            return self.signal
        if at_sync_point and _any_process(self.signal is not None):
            return self.signal or "a stop signal (on another process)"
        return None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = float(v)
        else:  # per-layer statistics
            out[f"{k}_max"] = float(v.max())
            out.update({f"{k}/layer{i}": float(x) for i, x in enumerate(v)})
    return out


def _check_finite(state, cfg: Config, ckpt: Checkpointer) -> None:
    bad = int(state.bad_step)
    if bad >= 0 and not cfg.train.skip_nonfinite_steps:
        last = ckpt.latest_step()
        raise TrainingError(
            f"non-finite loss or gradient at step {bad + 1}; stopped. Last good checkpoint: "
            f"{'none' if last is None else f'step {last}'} in {ckpt.directory}. "
            "Set train.skip_nonfinite_steps=true to skip such steps instead."
        )


def train_loop(s: Session, state, it, ckpt: Checkpointer, log: MetricsLogger):
    """Steps from `state.step` to the stop step; returns (state, the signal that stopped it or None)."""
    cfg, t = s.cfg, s.cfg.train
    start, stop_at = int(state.step), t.steps if t.stop_at == 0 else min(t.stop_at, t.steps)
    peak = t.peak_flops or measure_peak_flops()
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    config_dict = to_dict(cfg)
    log_start = start
    with StopFlag() as stop:
        window_t0, window_start, sums, stopping = time.perf_counter(), start, None, None
        for step in range(start, stop_at):
            state, metrics = s.train_step(state, put_batch(s, next(it)))
            done = step + 1
            stopping = stop.agreed(at_sync_point=done % t.log_every == 0)
            # losses are averaged over the log window (device-side adds: no host sync per step)
            window = {k: metrics[k] for k in AVERAGED}
            sums = window if sums is None else jax.tree.map(jnp.add, sums, window)
            if done == start + 1:  # the first step includes compilation: time it apart
                jax.block_until_ready(state.step)
                log.message(f"first step (compile + run) {time.perf_counter() - window_t0:.1f}s")
                window_t0, window_start = time.perf_counter(), done
            if done % t.log_every == 0 or done == stop_at or stopping:
                m = _scalars({**metrics, **jax.tree.map(lambda x: x / (done - log_start), sums)})
                sums, log_start = None, done
                _check_finite(state, cfg, ckpt)
                tok_s = tokens_per_step * max(done - window_start, 1) / max(time.perf_counter() - window_t0, 1e-9)
                m.update(tokens_per_sec=tok_s, mfu=tok_s * flops_per_token / (peak * jax.device_count()),
                         perplexity=float(np.exp(min(m["loss"], 50))))
                log.log(done, m)
                window_t0, window_start = time.perf_counter(), done
            if t.eval_every and done % t.eval_every == 0 and done != stop_at:
                log.log(done, evaluate(s, state), split="eval")
            if (t.ckpt_every and done % t.ckpt_every == 0) or done == stop_at or stopping:
                _check_finite(state, cfg, ckpt)  # never save a state past a non-finite step
                ckpt.save(done, state, it.get_state(), config_dict)
            if stopping:
                log.message(f"{stopping} received: saved step {done} to {ckpt.directory}; exiting")
                break
    return state, stopping


def _start_message(s: Session, ckpt: Checkpointer, start: int, data_restored: bool) -> str:
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    text = (f"{'resuming at step ' + str(start) if start else 'starting'} in {s.run_dir} "
            f"({jax.device_count()} {jax.devices()[0].platform} devices{processes})")
    if start and not data_restored:
        files = ckpt.data_files(start)
        why = f"it holds {files}: the process layout changed" if files else "it predates per-process data positions"
        text += (f"\nwarning: checkpoint step {start} has no data position for this process ({ckpt.data_file}); "
                 f"{why}. The data stream restarts from its beginning (documents already trained on are seen again)")
    return text


def run(cfg: Config) -> dict:
    """Trains (or resumes) `cfg`, evaluates, samples and plots. The README's main job."""
    s = open_session(cfg)
    t, is_main = cfg.train, jax.process_index() == 0
    ckpt = Checkpointer(s.run_dir, t.keep_checkpoints, t.async_checkpoints)
    log = None
    try:
        state, data_state = restore_or_init(s, ckpt)
        if is_main:
            (s.run_dir / "config.yaml").write_text(to_yaml(cfg))
        it = data_lib.make_iterator(cfg.data, "train", s.tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count())
        if data_state is not None:
            it.set_state(data_state)
        start = int(state.step)
        log = MetricsLogger(s.run_dir, t.steps, start, enabled=is_main)
        log.message(_start_message(s, ckpt, start, data_state is not None))
        state, stopped = train_loop(s, state, it, ckpt, log)
        ckpt.wait()
        eval_metrics = {}
        if not stopped:
            eval_metrics = evaluate(s, state)
            log.log(int(state.step), eval_metrics, split="eval")
            # every process decodes (the steps are collective over the sharded parameters); process 0 logs
            for prompt, text in zip(t.sample_prompts, sample(s, state, list(t.sample_prompts), t.sample_tokens)
                                    if t.sample_prompts else []):
                log.message(f"--- sample (greedy) ---\n{prompt}{text}")
    finally:
        ckpt.close()  # waits for an in-flight save
        if log is not None:
            log.close()
    if is_main and not stopped:
        baseline = data_lib.unigram_baseline(cfg.data, s.tokenizer)
        print(f"validation loss {eval_metrics['loss']:.3f} nats/token; unigram baseline {baseline:.3f} "
              f"(the train split's token frequencies); loss curve: {plot_run(s.run_dir, baseline=baseline)}")
        eval_metrics = {**eval_metrics, "unigram_baseline": baseline}
    return {"eval": eval_metrics, "state": state, "session": s, "stopped_by": stopped}


def load_trained(cfg: Config):
    """(session, state) from the latest checkpoint in `train.run_dir`; an error if there is none."""
    s = open_session(cfg)
    ckpt = Checkpointer(s.run_dir, cfg.train.keep_checkpoints, use_async=False)
    if ckpt.latest_step() is None:
        raise TrainingError(f"no checkpoint in {ckpt.directory}; train first (deepseek-jax train ...)")
    state, _ = restore_or_init(s, ckpt)
    ckpt.close()
    return s, state


def sample(s: Session, state, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Completions of text prompts with the latent-cache decoder."""
    from deepseek_jax.generate import generate

    ids = [s.tokenizer.encode(p) for p in prompts]
    variables = {"params": state.params, "router": state.router}
    new = generate(s.model, variables, ids, max_new_tokens, s.tokenizer.eos_id, s.tokenizer.pad_id,
                   temperature, top_p, seed)
    return [s.tokenizer.decode(n) for n in new]
