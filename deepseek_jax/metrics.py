"""Run metrics: a logger writing JSON lines, TensorBoard events and a console bar; a loss plot.

Layout of a run directory:

    run_dir/metrics.jsonl   one {"step", "split", "time", **metrics} object per `log` call, appended
    run_dir/tensorboard/    tensorboardX event files, tags "{split}/{name}"
    run_dir/loss.png        written by `plot_run`

The JSON file is the record of truth: it is flushed at every call, survives a resume (a new logger
appends to it) and is what `read_metrics` and `plot_run` read. A resumed run re-logs the steps after
its last checkpoint, so readers keep the last record per (split, step). TensorBoard is told the same
through `purge_step`, which hides the earlier run's events from the resume step on.

Metric names the console understands: `loss` (shown in the bar, and as `ppl` = exp(loss) in eval
lines), `tokens_per_sec` (shown as tok/s) and `mtp_loss` (plotted). Any other name is recorded only.

Model FLOP utilisation: MFU = tokens/s · model FLOPs per token / (peak FLOP/s per device · devices),
the peak configured (`train.peak_flops`) or measured on a float32 matmul (`measure_peak_flops`).
"""

import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from deepseek_jax.tokenizer import DataError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED = ("step", "split", "time")


class MetricsLogger:
    """Writes each `log` call to metrics.jsonl, TensorBoard and the console.

    With `enabled=False` (every process but the first in a multi-host run) each method does nothing
    and no file is touched. With `console=False` nothing is printed; the files are still written.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        console: bool = True,
    ):
        self.enabled, self.console = enabled, console
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        _drop_partial_line(path)
        self._jsonl = path.open("a", encoding="utf-8")
        # Imported here: tensorboardX imports torch when it is installed (seconds), and the
        # disabled loggers of other hosts, or a process that only plots, need none of it.
        from tensorboardX import SummaryWriter

        # tensorboardX names event files by the second and host, and opens them with "wb": two
        # loggers started within one second would overwrite each other without a unique suffix.
        self._writer = SummaryWriter(
            str(self.run_dir / TENSORBOARD_DIR),
            purge_step=start_step or None,
            filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}",
        )
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not console,
        )

    def log(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        """Record `metrics` at `step`: JSON line, TensorBoard scalars, bar or summary line."""
        if not self.enabled:
            return
        values = _to_floats(metrics)
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record |= {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if math.isfinite(value):  # TensorBoard draws NaN/inf as spikes that hide the curve
                self._writer.add_scalar(f"{split}/{name}", value, global_step=int(step))
        self._writer.flush()
        if split == "train":
            self._advance_bar(int(step), values)
        else:
            self.message(format_summary(int(step), split, values))

    def message(self, text: str) -> None:
        """Print a line above the progress bar without breaking it."""
        if self.enabled and self.console:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        """Flush and close the files and the bar; later calls do nothing."""
        if not self.enabled:
            return
        self.enabled = False
        self._bar.close()
        self._writer.close()
        self._jsonl.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _advance_bar(self, step: int, values: Mapping[str, float]) -> None:
        """Move the bar to `step` (tqdm derives the rate and ETA) and show loss and tok/s."""
        postfix = []
        if "loss" in values:
            postfix.append(f"loss={values['loss']:.4g}")
        if "tokens_per_sec" in values:
            postfix.append(f"tok/s={_si(values['tokens_per_sec'])}")
        self._bar.set_postfix_str(", ".join(postfix), refresh=False)
        self._bar.update(max(0, step - self._bar.n))


def format_summary(step: int, split: str, values: Mapping[str, float]) -> str:
    """One console line, e.g. "step 200 eval: loss 3.21 ppl 24.8"; ppl = exp(loss) unless given."""
    values = dict(values)
    if "loss" in values and "ppl" not in values:
        loss = values.pop("loss")
        ppl = math.inf if loss > 700 else math.exp(loss)  # exp overflows past ~709 (diverged run)
        values = {"loss": loss, "ppl": ppl, **values}
    parts = " ".join(f"{name} {value:.4g}" for name, value in values.items())
    return f"step {step} {split}: {parts}"


def measure_peak_flops(n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of one device on a float32 n x n matmul (the MFU denominator when not configured)."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        f(x).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float, n_devices: int) -> float:
    """Model FLOP utilisation: the share of the devices' peak FLOP/s the model's FLOPs used."""
    return tokens_per_sec * flops_per_token / (peak_flops * n_devices)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of run_dir/metrics.jsonl in file order, resumed runs included.

    A last line cut short by a killed process is skipped with a warning; a bad line elsewhere
    raises.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping truncated last line {i + 1}", stacklevel=2)
                break
            raise DataError(f"{path}:{i + 1}: not a JSON record ({err})") from err
    return records


def latest_per_step(records: list[dict], split: str) -> list[dict]:
    """The records of `split`, the last one per step, sorted by step (a resume re-logs steps)."""
    by_step = {r["step"]: r for r in records if r.get("split") == split}
    return [by_step[s] for s in sorted(by_step)]


def plot_run(
    run_dir: str | Path, out: str | Path | None = None, baseline: float | None = None
) -> Path:
    """Draw train loss (and MTP loss), eval loss points and an optional unigram baseline to a PNG.

    Args:
        out: the PNG path; run_dir/loss.png by default.
        baseline: loss of a unigram model of the data, drawn as a labelled horizontal line.
    """
    # Imported here: matplotlib costs ~0.5 s at start-up and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (plot reads RUN_DIR/{METRICS_FILE})")
    records = read_metrics(run_dir)
    train = [r for r in latest_per_step(records, "train") if r.get("loss") is not None]
    if not train:
        raise DataError(f"no train records with a loss in {run_dir / METRICS_FILE}")
    out = Path(out).expanduser() if out is not None else run_dir / "loss.png"

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    ax.plot(*_series(train, "loss"), label="train loss", lw=1.2)
    if any(r.get("mtp_loss") is not None for r in train):
        ax.plot(*_series(train, "mtp_loss"), label="train MTP loss", lw=1.0, alpha=0.8)
    evals = [r for r in latest_per_step(records, "eval") if r.get("loss") is not None]
    if evals:
        ax.plot(*_series(evals, "loss"), "o", label="eval loss", ms=5)
    if baseline is not None:
        label = f"unigram baseline ({baseline:.3g})"
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=label)
    ax.set(xlabel="step", ylabel="loss", title=run_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) with missing or null values as NaN, which matplotlib draws as gaps."""
    values = [r.get(key) for r in records]
    return [r["step"] for r in records], [math.nan if v is None else v for v in values]


def _to_floats(metrics: Mapping[str, float]) -> dict[str, float]:
    """Python floats from numpy/jax scalars; the record's own keys may not be metric names."""
    clash = [k for k in metrics if k in RESERVED]
    if clash:
        raise ValueError(f"metric names {clash} clash with the record's own keys {RESERVED}")
    return {str(k): float(v) for k, v in metrics.items()}


def _drop_partial_line(path: Path) -> None:
    """Cut a last line lacking its newline (killed mid-write) so appends stay valid JSONL."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _si(x: float) -> str:
    """Compact number for the bar: 1234567 -> "1.23M"."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
