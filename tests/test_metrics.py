"""MetricsLogger files (JSONL, TensorBoard), console output, read_metrics and plot_run."""

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.figure import Figure
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from deepseek_jax.metrics import (
    MetricsLogger,
    format_summary,
    latest_per_step,
    plot_run,
    read_metrics,
)


def read_events(run_dir) -> list[event_pb2.Event]:
    """Every event of every file under run_dir/tensorboard, TFRecord framing and CRCs checked."""
    events = []
    for path in sorted((run_dir / "tensorboard").glob("*tfevents*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12 : pos + 12 + length]
            (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert body_crc == masked_crc32c(body)
            events.append(event_pb2.Event.FromString(body))
            pos += 16 + length
    return events


def scalars(run_dir) -> dict[tuple[str, int], float]:
    return {
        (v.tag, e.step): v.simple_value for e in read_events(run_dir) for v in e.summary.value
    }


def write_run(run_dir):
    """A run killed after step 30, resumed from its step-20 checkpoint: re-logs steps 20, 30."""
    with MetricsLogger(run_dir, total_steps=40, console=False) as log:
        for step, loss in [(10, 5.0), (20, 4.0), (30, 9.0)]:
            log.log(step, {"loss": loss, "mtp_loss": loss + 1})
        log.log(20, {"loss": 4.5}, split="eval")
    with MetricsLogger(run_dir, total_steps=40, start_step=20, console=False) as log:
        for step, loss in [(20, 3.9), (30, 3.0), (40, 2.0)]:
            log.log(step, {"loss": loss, "mtp_loss": loss + 1})
        log.log(40, {"loss": 2.5}, split="eval")


def test_jsonl_records_and_appends_across_loggers(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=10, console=False)
    log.log(1, {"loss": np.float32(2.5), "tokens_per_sec": np.int64(1000), "grad_norm": np.nan})
    log.log(1, {"loss": 3.0}, split="eval")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # flushed before close
    assert len(lines) == 2
    log.close()
    log = MetricsLogger(tmp_path, total_steps=10, start_step=1, console=False)
    log.log(2, {"loss": 2.0})
    log.close()

    records = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (1, "eval"), (2, "train")]
    first = records[0]
    assert list(first) == ["step", "split", "time", "loss", "tokens_per_sec", "grad_norm"]
    assert first["loss"] == 2.5 and first["tokens_per_sec"] == 1000.0
    assert first["grad_norm"] is None  # non-finite kept as null: the file stays strict JSON
    assert isinstance(first["time"], float)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_reserved_metric_name_rejected(tmp_path):
    with MetricsLogger(tmp_path, total_steps=1, console=False) as log:
        with pytest.raises(ValueError, match="step"):
            log.log(1, {"step": 1.0})


def test_tensorboard_holds_the_scalars(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, console=False) as log:
        log.log(1, {"loss": np.float32(2.5), "lr": jnp.float32(1e-3), "grad_norm": math.inf})
        log.log(2, {"loss": 2.25})
        log.log(2, {"loss": 3.5}, split="eval")
    got = scalars(tmp_path)
    assert got == pytest.approx(
        {
            ("train/loss", 1): 2.5,
            ("train/lr", 1): 1e-3,
            ("train/loss", 2): 2.25,
            ("eval/loss", 2): 3.5,
        }
    )  # the inf grad_norm is left out


def test_resume_purges_tensorboard_from_start_step(tmp_path):
    write_run(tmp_path)
    starts = [e.step for e in read_events(tmp_path) if e.HasField("session_log")]
    assert starts == [20]  # TensorBoard hides the first run's events from step 20 on
    assert ("train/loss", 40) in scalars(tmp_path)


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    log = MetricsLogger(run_dir, total_steps=10, enabled=False)
    log.log(1, {"loss": 1.0})
    log.log(1, {"loss": 1.0}, split="eval")
    log.message("hello")
    log.close()
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_console_bar_and_eval_line(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=100, console=True) as log:
        log.log(10, {"loss": 3.5, "tokens_per_sec": 12345.0})
        log.log(200, {"loss": 3.21}, split="eval")
        log.message("saved checkpoint")
    err = capsys.readouterr().err
    assert "10/100" in err and "loss=3.5" in err and "tok/s=12.3k" in err
    assert "step 200 eval: loss 3.21 ppl 24.78" in err
    assert "saved checkpoint" in err


def test_console_off_prints_nothing(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=10, console=False) as log:
        log.log(1, {"loss": 1.0})
        log.log(1, {"loss": 1.0}, split="eval")
        log.message("hello")
    assert capsys.readouterr() == ("", "")


def test_format_summary():
    line = format_summary(5, "eval", {"loss": 0.0, "acc": 0.5})
    assert line == "step 5 eval: loss 0 ppl 1 acc 0.5"
    assert "ppl inf" in format_summary(5, "eval", {"loss": 1e4})
    assert format_summary(5, "eval", {"ppl": 7.0}) == "step 5 eval: ppl 7"


def test_truncated_last_line_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    with pytest.warns(UserWarning, match="truncated"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with MetricsLogger(tmp_path, total_steps=10, start_step=1, console=False) as log:
        log.log(2, {"loss": 1.5})  # the partial line is cut first, so the file stays valid
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_corrupt_middle_line_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(tmp_path)


def test_missing_metrics_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        read_metrics(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_run(tmp_path / "nope")


def test_latest_per_step_keeps_last_record(tmp_path):
    write_run(tmp_path)
    train = latest_per_step(read_metrics(tmp_path), "train")
    assert [(r["step"], r["loss"]) for r in train] == [(10, 5.0), (20, 3.9), (30, 3.0), (40, 2.0)]


def test_plot_run_writes_png(tmp_path):
    write_run(tmp_path)
    out = plot_run(tmp_path, baseline=7.5)
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 500) and len(data) > 10_000  # a drawn figure, not a blank stub
    custom = plot_run(tmp_path, out=tmp_path / "plots" / "x.png")
    assert custom == tmp_path / "plots" / "x.png" and custom.is_file()


def test_plot_run_draws_deduplicated_resume(tmp_path, monkeypatch):
    write_run(tmp_path)
    figures = []
    save = Figure.savefig

    def recording_save(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_save)
    plot_run(tmp_path, baseline=7.5)
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train loss"].get_xdata()) == [10, 20, 30, 40]  # no zig-zag back to 20
    assert list(lines["train loss"].get_ydata()) == [5.0, 3.9, 3.0, 2.0]
    assert list(lines["train MTP loss"].get_ydata()) == [6.0, 4.9, 4.0, 3.0]
    assert list(lines["eval loss"].get_xdata()) == [20, 40]
    assert list(lines["unigram baseline (7.5)"].get_ydata()) == [7.5, 7.5]
    assert ax.get_title() == tmp_path.name


def test_plot_run_without_train_metrics_raises(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, console=False) as log:
        log.log(5, {"loss": 3.0}, split="eval")
    with pytest.raises(ValueError, match=r"no train records .*metrics\.jsonl"):
        plot_run(tmp_path)
