"""The single training / evaluation loop: restore or init, then train, evaluate, save.

Reads top to bottom. The host syncs with the device only at log, eval and save steps. SIGTERM and
SIGINT finish the current step (with several processes: the next log step), save, and return
normally. A run directory that holds a checkpoint is resumed automatically (state, data position,
step), into the new run's shardings.

Multi-process (one process per host; the CLI initialises `jax.distributed`): every process runs this
loop, and each jitted step is one program over a mesh spanning all processes' devices. Process i of
n reads documents i::n, global_batch_size / n rows per batch (multihost.py has the helpers);
process 0 trains the tokenizer while the others wait; all take the same number of eval
steps; each saves and restores its own data position, and a resume under another process count
restores the state, resharded, but restarts the data stream with a warning (one process's position
cannot be split or merged). The run directory must be shared; only process 0 logs, plots, prints.
"""

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import data as data_lib
from deepseek_jax import rundir
from deepseek_jax.checkpoint import (
    DIVERGED,
    Checkpointer,
    CheckpointError,
    check_compatible,
    nonfinite_leaf,
    restore_converted,
)
from deepseek_jax.config import Config, ConfigError, to_dict, to_yaml
from deepseek_jax.config.run import DEMO_SOURCE
from deepseek_jax.exact_match import Scorer, accuracy_by_tag
from deepseek_jax.generate import sample
from deepseek_jax.layers.moe.dispatch import check_backend
from deepseek_jax.metrics import MetricsLogger, measure_peak_flops, mfu, plot_run
from deepseek_jax.models import check_remat_backend
from deepseek_jax.multihost import (
    any_process,
    check_batch_split,
    in_lockstep,
    on_all_processes,
    on_process_0,
    put_batch,
    sync,
)
from deepseek_jax.params import train_flops_per_token
from deepseek_jax.program import Program, build_program
from deepseek_jax.sharding import batch_sharding, check_state_split, in_mesh, make_mesh, rules
from deepseek_jax.tokenizer import Tokenizer

AVERAGED = ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm", "skipped", "moe_dropped_frac", "index_loss")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the step."""


@dataclass(frozen=True)
class Session:
    """A run besides its state: the program, its steps jitted for the loop, tokenizer and directory."""

    program: Program
    tokenizer: Tokenizer
    run_dir: Path
    train_step: Callable  # program.train_step jitted (donating the state), in lockstep, under the mesh
    eval_step: Callable  # program.eval_step likewise (donating nothing)
    scorer: Scorer | None = None  # media records: held-out exact match per record "tag" (exact_match.py)


def open_session(cfg: Config) -> Session:
    """Tokenizer, program and jitted steps for `cfg` (no state yet)."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sync("open_session")  # the processes start together: the first barrier also sets up its channels
    tokenizer = _load_tokenizer(cfg, run_dir)
    mesh, mesh_rules = make_mesh(cfg.mesh), rules(cfg.mesh)
    check_batch_split(batch_sharding(mesh, mesh_rules), cfg)
    platform = mesh.devices.flat[0].platform
    check_backend(cfg.model.moe.dispatch, platform)
    check_remat_backend(cfg.model, platform)
    p = build_program(cfg, mesh, mesh_rules)
    check_state_split(p.state_target(), mesh)  # before any compile: JAX's own error is internal
    train_step = in_mesh(in_lockstep(jax.jit(p.train_step, donate_argnums=0)), mesh, mesh_rules)
    scorer = None if cfg.data.media is None else Scorer(p, tokenizer, engram=data_lib.engram_stage(cfg.model.engram,
                                                                                                  tokenizer))
    return Session(p, tokenizer, run_dir, train_step, in_mesh(in_lockstep(jax.jit(p.eval_step)), mesh, mesh_rules),
                   scorer)


def _load_tokenizer(cfg: Config, run_dir: Path):
    """The run's tokenizer; trained at most once, by process 0, when the run directory has none."""
    return on_all_processes(lambda: data_lib.load_tokenizer(cfg.data, run_dir, cfg.model.vocab_size, cfg.model))


def restore_or_init(s: Session, ckpt: Checkpointer):
    """(state, data-iterator state or None): the newest checkpoint that restores (damaged newer steps are
    skipped with a warning: Checkpointer.restore_latest), else a fresh state. A checkpoint holding a NaN or
    an infinity (the loop saves none; an older version's or a hand-edited one) is refused, naming the leaf."""
    cfg = s.program.cfg
    found = ckpt.restore_latest(s.program.state_target(), lambda stored: check_compatible(stored, cfg, s.run_dir))
    if found is None:
        # Traced outside the mesh: init's dummy batch has one row, which a mesh that splits the batch
        # cannot shard; out_shardings place the parameters, whose values need no mesh.
        if s.program.cfg.train.init_from:  # a converted checkpoint: its weights, a fresh optimizer
            variables = restore_converted(s.program.cfg.train.init_from, s.program.state_target())
            return s.program.state_from(variables["params"], variables["router"]), None
        return s.program.init_state(), None
    step, state, data_state, _ = found
    bad = nonfinite_leaf(state)
    if bad is not None:
        raise CheckpointError(f"checkpoint step {step} in {ckpt.directory} holds non-finite values ({bad}): no "
                              f"state to go on from. Move {ckpt.directory / str(step)} aside to use the step before")
    return state, data_state


def evaluate(s: Session, state) -> dict:
    """Held-out loss and perplexity over up to `train.eval_batches` validation batches.

    Each process reads its own validation documents, so the processes may run out of batches at
    different steps; since an eval step is collective they step together until all have run out
    (or `eval_batches` steps), one that has run out feeding an all-padding batch (no targets).
    Media records with a "tag" add `accuracy/<tag>`: every one's held-out exact match (exact_match.py)."""
    cfg, n_proc = s.program.cfg, jax.process_count()
    engram = data_lib.engram_stage(cfg.model.engram, s.tokenizer)  # None without Engram
    it = data_lib.make_iterator(cfg.data, "validation", s.tokenizer, repeat=False, shuffle=False,
                                process_index=jax.process_index(), process_count=n_proc, engram=engram,
                                model=cfg.model)
    padding = data_lib.padding_batch(cfg.data, n_proc, s.tokenizer.pad_id, engram, model=cfg.model)
    ce_sum = tokens = mtp = 0.0
    n = 0
    while n < cfg.train.eval_batches:
        batch = next(it, None)
        if not any_process(batch is not None):
            break
        batch = put_batch(padding if batch is None else batch, s.program.batch_sharding)
        out = s.eval_step(state.params, state.router, batch)
        ce_sum, tokens, mtp = ce_sum + float(out["ce_sum"]), tokens + float(out["tokens"]), mtp + float(out["mtp"])
        n += 1
    it.close()
    if tokens == 0:
        raise data_lib.DataError(f"validation split of {cfg.data.source} produced no tokens")
    loss = ce_sum / tokens
    accuracy = {} if s.scorer is None else accuracy_by_tag(s.scorer(state.params, state.router))
    return {"loss": loss, "perplexity": float(np.exp(loss)), "mtp_loss": mtp / max(n, 1), "tokens": tokens,
            **accuracy}


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
        if at_sync_point and any_process(self.signal is not None):
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


def _check_finite(state, metrics: dict, cfg: Config, ckpt: Checkpointer) -> None:
    """Stops the run after a non-finite step (train_step kept the state of the step before it).

    The newest checkpoint is the "last good" one unless its own parameters gave the non-finite loss
    (checkpoint step == the bad step's start, and the latest step, run from those same frozen parameters,
    is non-finite too): finite parameters can still overflow in the forward pass (a huge learning rate).
    That checkpoint is then moved to RUN_DIR/diverged_checkpoints/<step>, so a resume cannot pick it."""
    bad = int(state.bad_step)
    if bad < 0 or cfg.train.skip_nonfinite_steps:
        return
    ckpt.wait()
    last, note = ckpt.latest_step(), ""
    overflowed = not np.isfinite(float(metrics["total_loss"]) + float(metrics["grad_norm"]))
    if last == bad and overflowed and nonfinite_leaf(state) is None:  # (not a non-finite update itself)
        moved = ckpt.move_aside(last, DIVERGED)
        note = (f" The parameters of step {last} gave it (finite, but they overflow in the forward pass): "
                f"moved that checkpoint to {moved}.")
        last = ckpt.latest_step()
    raise TrainingError(
        f"non-finite loss, gradient or update at step {bad + 1}; stopped.{note} Last good checkpoint: "
        f"{'none' if last is None else f'step {last}'} in {ckpt.directory}. "
        "Set train.skip_nonfinite_steps=true to skip such steps instead."
    )


def train_loop(s: Session, state, it, ckpt: Checkpointer, log: MetricsLogger):
    """Steps from `state.step` to the stop step; returns (state, the signal that stopped it or None)."""
    cfg, t = s.program.cfg, s.program.cfg.train
    start, stop_at = int(state.step), t.steps if t.stop_at == 0 else min(t.stop_at, t.steps)
    peak = t.peak_flops or measure_peak_flops()
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    config_dict = to_dict(cfg)
    log_start = start
    with StopFlag() as stop:
        window_t0, window_start, sums, stopping = time.perf_counter(), start, None, None
        for step in range(start, stop_at):
            state, metrics = s.train_step(state, put_batch(next(it), s.program.batch_sharding))
            done = step + 1
            stopping = stop.agreed(at_sync_point=done % t.log_every == 0)
            # losses are averaged over the log window (device-side adds: no host sync per step)
            window = {k: metrics[k] for k in AVERAGED if k in metrics}
            sums = window if sums is None else jax.tree.map(jnp.add, sums, window)
            if done == start + 1:  # the first step includes compilation: time it apart
                jax.block_until_ready(state.step)
                log.message(f"first step (compile + run) {time.perf_counter() - window_t0:.1f}s")
                window_t0, window_start = time.perf_counter(), done
            if done % t.log_every == 0 or done == stop_at or stopping:
                m = _scalars({**metrics, **jax.tree.map(lambda x: x / (done - log_start), sums)})
                sums, log_start = None, done
                _check_finite(state, metrics, cfg, ckpt)
                tok_s = tokens_per_step * max(done - window_start, 1) / max(time.perf_counter() - window_t0, 1e-9)
                m.update(tokens_per_sec=tok_s, mfu=mfu(tok_s, flops_per_token, peak, jax.device_count()),
                         perplexity=float(np.exp(min(m["loss"], 50))))
                if cfg.data.media is not None:  # this process's media records skipped so far (skip_bad_records)
                    m["skipped_records"] = it.skipped_records
                log.log(done, m)
                window_t0, window_start = time.perf_counter(), done
            if t.eval_every and done % t.eval_every == 0 and done != stop_at:
                log.log(done, evaluate(s, state), split="eval")
            if (t.ckpt_every and done % t.ckpt_every == 0) or done == stop_at or stopping:
                _check_finite(state, metrics, cfg, ckpt)  # never save a state past a non-finite step
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
    """Trains (or resumes) `cfg`, evaluates, samples and plots. The README's main job.

    One writer per run directory: the lock (rundir.py) is taken before the tokenizer, the data or the
    checkpoints are touched and before any compile; a second writer fails at once, naming the first."""
    lock = _lock_run_dir(cfg.train.run_dir)
    try:
        return _train(cfg)
    finally:
        lock.release()


def _lock_run_dir(run_dir: str) -> rundir.WriterLock:
    """The run directory's writer lock, held by process 0; TrainingError on every process when taken."""
    lock = rundir.WriterLock(run_dir)
    failed = TrainingError(f"process 0 could not take the writer lock of {run_dir} (its error is in its output)")
    holder = on_process_0(lock.acquire, failed)  # an OSError there (permissions, full disk) stops all
    if any_process(holder is not None):
        raise TrainingError(f"run directory {run_dir} is in use by another writer ({holder or 'see process 0'}); "
                            "wait for it or use another train.run_dir")
    return lock


def _train(cfg: Config) -> dict:
    """`run` under the writer lock."""
    data_lib.check_splits(cfg, jax.process_count())  # an empty split fails now, not after training
    s = open_session(cfg)
    t, is_main = cfg.train, jax.process_index() == 0
    if t.sample_prompts:  # the end-of-run samples must fit too: checked now, not after training
        longest = max(len(s.tokenizer.encode(p)) for p in t.sample_prompts)
        if longest + t.sample_tokens > cfg.model.max_seq_len:
            raise ConfigError(f"train.sample_prompts: the longest is {longest} tokens, + train.sample_tokens="
                              f"{t.sample_tokens} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    ckpt = Checkpointer(s.run_dir, t.keep_checkpoints, t.async_checkpoints)
    log = None
    try:
        resuming = ckpt.latest_step() is not None  # a fresh start's fingerprints.json (if any) is replaced, unchecked
        current = rundir.checked_fingerprints(cfg, s.run_dir, s.tokenizer.path, writer=True, check=resuming)
        state, data_state = restore_or_init(s, ckpt)
        rundir.record_on_process_0(s.run_dir, current, resuming=resuming)  # now: a refused config records nothing
        if is_main:
            (s.run_dir / "config.yaml").write_text(to_yaml(cfg))
        it = data_lib.make_iterator(cfg.data, "train", s.tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count(), model=cfg.model,
                                    engram=data_lib.engram_stage(cfg.model.engram, s.tokenizer))
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
            variables = {"params": state.params, "router": state.router}
            for prompt, text in zip(t.sample_prompts, sample(s.program.model, variables, s.tokenizer,
                                                             list(t.sample_prompts), t.sample_tokens)
                                    if t.sample_prompts else []):
                log.message(f"--- sample (greedy) ---\n{prompt}{text}")
    finally:
        ckpt.close()  # waits for an in-flight save
        if log is not None:
            log.close()
    if is_main and not stopped:
        baseline = data_lib.unigram_baseline(cfg.data, s.tokenizer, model=cfg.model)
        print(f"validation loss {eval_metrics['loss']:.3f} nats/token; unigram baseline {baseline:.3f} "
              f"(the train split's token frequencies); loss curve: {plot_run(s.run_dir, baseline=baseline)}")
        accuracy = {k.split("/", 1)[1]: v for k, v in eval_metrics.items() if k.startswith("accuracy/")}
        if accuracy:  # tagged media records (the multimodal demo)
            print("held-out exact match: " + ", ".join(f"{tag} {v:.1%}" for tag, v in accuracy.items()))
        eval_metrics = {**eval_metrics, "unigram_baseline": baseline}
    return {"eval": eval_metrics, "state": state, "session": s, "stopped_by": stopped}


def load_converted(cfg: Config, directory: str) -> tuple[Session, dict]:
    """(session, {"params", "router"}) of a converted checkpoint, for eval / generate (no optimizer)."""
    s = open_session(cfg)
    return s, restore_converted(directory, s.program.state_target())


def load_trained(cfg: Config, *, data_check: bool = False):
    """(session, state) from the newest intact checkpoint in `train.run_dir`; an error if there is none.

    A reader (eval, generate): no lock, nothing written (no tokenizer trained, no checkpoint cleaned up or
    moved), so it may run beside the run's training. Another tokenizer than the run's is refused; with
    `data_check` (eval) a changed data stream is a warning when data.source is there (rundir.py). Without it
    the corpus is not read: generate works on a run directory copied to a machine without it."""
    ckpt = Checkpointer(cfg.train.run_dir, use_async=False, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise TrainingError(f"no checkpoint in {ckpt.directory}; train first (deepseek-jax train ...)")
        own = Path(cfg.train.run_dir) / "tokenizer.json"
        if not cfg.data.tokenizer and cfg.data.source != DEMO_SOURCE and not own.is_file():
            raise data_lib.DataError(f"{own} is missing: the checkpoints need the tokenizer they were trained with "
                                     "(restore the file, or give it as data.tokenizer=PATH)")
        s = open_session(cfg)
        rundir.checked_fingerprints(cfg, s.run_dir, s.tokenizer.path, writer=False, data_check=data_check)
        state, _ = restore_or_init(s, ckpt)
    finally:
        ckpt.close()
    return s, state
