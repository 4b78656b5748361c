"""Command line: `deepseek-jax COMMAND CONFIG... [a.b=value ...]` (also `python -m deepseek_jax`).

Commands:
  train     train (or resume) a run; the default command, on the embedded default config
  eval      held-out loss and perplexity of a run's latest checkpoint
  generate  complete prompts with a run's latest checkpoint (--prompt, repeatable; --speculative: greedy
            with DSpark drafts verified by the model, V4.1, and its acceptance rate); --image / --audio /
            --video FILE (repeatable, any mix) go with every prompt: where it says <image> / <audio> /
            <video> (the next file of that kind), the rest before its text, in the order given;
            --prefill-chunk N: prompt tokens per prefill call (default 4096, 0 = all at once)
  inspect   print the model's parameter table and run one forward pass (only its output shapes,
            from jax.eval_shape, when the parameters would not fit in a quarter of memory)
  config    print the resolved config as YAML (`config show CONFIG...` also works)
  plot      write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl
  plan      per-device memory and collective volume of a train step on --devices N (--mesh FILE),
            compiled on N devices (fake CPU ones if need be) or, with --lower-only, estimated
  convert   `convert import SRC OUT`: a checkpoint directory (transformers or DeepSeek layout, FP8 / FP4
            or not) -> a converted checkpoint OUT that `train OUT/config.yaml`, `eval --checkpoint OUT`,
            `generate --checkpoint OUT` and `plan OUT/config.yaml` take (--dtype float32|bfloat16);
            `convert export CKPT OUT [--layout hf|official|hf_text] [--quant none|fp8|release]`: a converted
            checkpoint or run directory -> safetensors + config.json that transformers loads (the layouts
            a family writes: V3 / V4 hf (default), official; V4.1 official (default), hf_text; MLA / DSA on
            mHC streams (the article model): official only; `--quant fp8`
            on V4.1, or `release`: the release's dtypes and blocks per tensor, FP8 32×32 / FP4 experts)
--checkpoint DIR (eval, generate): a converted checkpoint's weights and config instead of a run's.
--mesh FILE merges a mesh file last; --cpu-devices N gives JAX N fake CPU devices (try meshes on a CPU).
Paths on the command line may start with `~`. A flag the command does not read is an error (FLAG_USERS),
and flag values are checked before anything is loaded. No logic lives here: each command calls one library
function.

Exit codes: 0 done; 1 an internal error (a bug: one line, `--debug` shows the traceback); 2 bad input or an
expected failure (a config, flag, file, checkpoint or file-system problem, e.g. a full disk: one line
`error: ...` naming it); 130 interrupted (Ctrl-C outside training; training stops at the next step, saves and
exits 0).
"""

import argparse
import math
import re
import sys
from pathlib import Path

import yaml

from deepseek_jax.config import ConfigError, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "train" / "tiny_v4_stdlib.yaml"
COMMANDS = ("train", "eval", "generate", "inspect", "config", "plot", "plan", "convert")
# The commands that read a flag (argparse dest). Flags not listed (--cpu-devices, --debug, the multi-process
# ones) apply to all. Their defaults (DEFAULTS) are filled in after this check, so a flag is "given" iff set.
FLAG_USERS = {
    **dict.fromkeys(("prompt", "media", "max_new_tokens", "temperature", "top_p", "speculative", "prefill_chunk",
                     "seed"), ("generate",)),
    **dict.fromkeys(("batch", "seq_len"), ("inspect",)),
    **dict.fromkeys(("devices", "lower_only", "hbm_gib", "headroom"), ("plan",)),
    **dict.fromkeys(("layout", "quant", "max_shard_gb"), ("convert export",)),
    "dtype": ("convert import", "convert export"),
    "checkpoint": ("eval", "generate"),
    "mesh": ("train", "eval", "generate", "inspect", "config", "plan"),
}
DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch": 2, "seq_len": 64,
            "dtype": "float32", "quant": "none", "max_shard_gb": 5.0}
# A TensorStore failure (Orbax's storage layer) is a ValueError whose message starts with an absl status code.
STATUS = re.compile(r"^(NOT_FOUND|DATA_LOSS|PERMISSION_DENIED|FAILED_PRECONDITION|INVALID_ARGUMENT|OUT_OF_RANGE|"
                    r"RESOURCE_EXHAUSTED|ALREADY_EXISTS|UNAVAILABLE|ABORTED|UNKNOWN|INTERNAL): ")
# ... and a JaxRuntimeError (a RuntimeError) with one of these is the machine's limit, not a bug.
RUNTIME = re.compile(r"^(RESOURCE_EXHAUSTED|DEADLINE_EXCEEDED|UNAVAILABLE): ")
TS_SPEC = re.compile(r"\s*\[tensorstore_spec='(?:[^'\\]|\\.)*'\]")  # the full JSON spec TensorStore appends


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek-jax", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="train", choices=COMMANDS)
    p.add_argument("args", nargs="*", help="config YAML files, then a.b=value overrides (plot: RUN_DIR)")
    p.add_argument("--prompt", action="append", help="generate: a prompt (repeatable)")
    for kind, what in (("image", "an image file"), ("audio", "a WAV file"), ("video", "a GIF (video)")):
        p.add_argument(f"--{kind}", dest="media", action="append", type=_media_kind(kind), metavar="PATH",
                       help=f"generate: {what} for every prompt, at its <{kind}> marker or else before its text "
                            "(repeatable; media in flag order)")
    p.add_argument("--max-new-tokens", type=int, help="generate: at most this many new tokens (default 64)")
    p.add_argument("--temperature", type=float, help="generate: 0 = greedy (default)")
    p.add_argument("--top-p", type=float, help="generate: nucleus mass in (0, 1] (default 1 = no filtering)")
    p.add_argument("--speculative", action="store_true",
                   help="generate: greedy decoding with DSpark drafts (V4.1), printing the acceptance rate")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="generate: prompt tokens per prefill call (default 4096; 0 = the whole prompt at once)")
    p.add_argument("--seed", type=int, help="generate: sampling seed (default 0)")
    p.add_argument("--batch", type=int, help="inspect: batch size (default 2)")
    p.add_argument("--seq-len", type=int, help="inspect: sequence length (default 64)")
    p.add_argument("--mesh", help="a mesh YAML merged after the config files")
    p.add_argument("--devices", type=int, help="plan: devices to plan for (default: those present)")
    p.add_argument("--lower-only", action="store_true", help="plan: do not compile; estimate collectives")
    p.add_argument("--hbm-gib", type=float, help="plan: device memory (GiB); prints whether state + activations fit")
    p.add_argument("--headroom", type=float, help="plan: fraction of --hbm-gib kept free (default 0.1)")
    p.add_argument("--cpu-devices", type=int, help="fake CPU devices for JAX (set before it starts)")
    p.add_argument("--checkpoint", help="eval / generate: a converted checkpoint directory (convert import OUT)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="convert: stored parameter dtype (import) / tensor dtype (export); default float32")
    p.add_argument("--layout", choices=("hf", "official", "hf_text"),
                   help="convert export: tensor names (default: the family's first, hf; V4.1 and the "
                        "article layout (MLA / DSA on mHC streams) official)")
    p.add_argument("--quant", choices=("none", "fp8", "release"),
                   help="convert export: fp8 = the FP8 block weights of the releases (V3 / V4 128×128; V4.1 as "
                        "released, FP4 experts included); release = as released (V4.1 only); default none")
    p.add_argument("--max-shard-gb", type=float, help="convert export: safetensors shard size (default 5)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-process: jax.distributed.initialize() detects coordinator, process count and id "
                        "(Cloud TPU, SLURM, Open MPI, Kubernetes); or give the three flags below")
    p.add_argument("--coordinator", help="multi-process: coordinator address host:port")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--debug", action="store_true", help="on an error, raise it with its full traceback")
    return p


def _media_kind(kind: str):
    """argparse type of --image / --audio / --video: (kind, path with ~ expanded), all appended to one list in
    flag order."""
    def tag(path: str) -> tuple[str, str]:
        return kind, str(Path(path).expanduser())
    tag.__name__ = kind
    return tag


def _flag(ns, dest: str) -> str:
    """The command-line spelling of an argparse dest (media: the first of --image / --audio / --video given)."""
    return f"--{ns.media[0][0]}" if dest == "media" else "--" + dest.replace("_", "-")


def _command(ns) -> str:
    """The command as FLAG_USERS names it (`convert import` / `convert export`); an InputError for convert's
    usage."""
    from deepseek_jax.inspect_model import InputError

    if ns.command != "convert":
        return ns.command
    if len(ns.args) != 3 or ns.args[0] not in ("import", "export"):
        raise InputError(f"convert takes `import SRC OUT` or `export CKPT OUT [--layout hf|official|hf_text] "
                         f"[--quant none|fp8|release]`, got {' '.join(ns.args) or 'nothing'}")
    return f"convert {ns.args[0]}"


def _check_flags(ns) -> None:
    """InputError for a flag the command does not read or a value out of range, before anything is loaded;
    then fills in the defaults and expands `~` in path flags."""
    from deepseek_jax.inspect_model import InputError

    command = _command(ns)
    for dest, users in FLAG_USERS.items():
        if getattr(ns, dest) is not None and getattr(ns, dest) is not False and command not in users:
            raise InputError(f"{_flag(ns, dest)} is only used by {' and '.join(users)}, not {command}")
    for dest, value in DEFAULTS.items():
        if getattr(ns, dest) is None:
            setattr(ns, dest, value)
    for dest in ("batch", "seq_len", "devices", "cpu_devices", "num_processes"):
        if getattr(ns, dest) is not None and getattr(ns, dest) < 1:
            raise InputError(f"{_flag(ns, dest)} must be >= 1, got {getattr(ns, dest)}")
    if ns.process_id is not None and not 0 <= ns.process_id < (ns.num_processes or math.inf):
        raise InputError(f"--process-id must be in [0, --num-processes={ns.num_processes}), got {ns.process_id}")
    if ns.hbm_gib is not None and not (ns.hbm_gib > 0 and math.isfinite(ns.hbm_gib)):
        raise InputError(f"--hbm-gib must be a finite number > 0, got {ns.hbm_gib}")
    if ns.headroom is not None and ns.hbm_gib is None:
        raise InputError("--headroom is a fraction of --hbm-gib: give --hbm-gib N too")
    if ns.headroom is not None and not 0 <= ns.headroom < 1:
        raise InputError(f"--headroom must be in [0, 1), got {ns.headroom}")
    if not (ns.max_shard_gb > 0 and math.isfinite(ns.max_shard_gb)):
        raise InputError(f"--max-shard-gb must be a finite number > 0, got {ns.max_shard_gb}")
    if ns.command == "generate":
        from deepseek_jax.generate import check_sampling

        check_sampling(ns.max_new_tokens, ns.temperature, ns.top_p, ns.prefill_chunk, ns.speculative, flags=True)
    ns.mesh, ns.checkpoint = (None if x is None else str(Path(x).expanduser()) for x in (ns.mesh, ns.checkpoint))


def _config(args: list[str], mesh: str | None = None, checkpoint: str | None = None):
    args = args[1:] if args[:1] == ["show"] else args  # `config show CONFIG...` reads like `config CONFIG...`
    files = [str(Path(a).expanduser()) for a in args if "=" not in a]
    if checkpoint:  # a converted checkpoint's own config first; files and overrides given after it
        files = [str(Path(checkpoint) / "config.yaml")] + files
    files = files or [str(DEFAULT_CONFIG)]
    return load_config(files + ([mesh] if mesh else []), [a for a in args if "=" in a])


def _print0(text: str) -> None:
    """Prints on process 0 only (every process computes; one reports)."""
    import jax

    if jax.process_index() == 0:
        print(text)


def _dispatch(ns) -> int:
    if ns.command == "convert":
        return _convert(ns)
    if ns.command == "plot":
        from deepseek_jax.inspect_model import InputError
        from deepseek_jax.metrics import plot_run

        if len(ns.args) > 1:
            raise InputError(f"plot takes one RUN_DIR, got {ns.args}")
        print(plot_run(ns.args[0] if ns.args else "runs/tiny_v4_stdlib"))
        return 0
    cfg = _config(ns.args, ns.mesh, ns.checkpoint if ns.command in ("eval", "generate") else None)
    if ns.command == "config":
        print(to_yaml(cfg), end="")
    elif ns.command == "inspect":
        from deepseek_jax.inspect_model import inspect

        inspect(cfg.model, batch=ns.batch, seq_len=ns.seq_len, seed=cfg.train.seed)
    elif ns.command == "train":
        from deepseek_jax.run import run

        run(cfg)
    elif ns.command == "eval":
        from deepseek_jax.run import TrainingError, evaluate

        s, state = _load(cfg, ns.checkpoint, data_check=True)
        metrics = evaluate(s, state)
        if not math.isfinite(metrics["loss"]):  # finite parameters that overflow (a diverged run): no result
            where = ns.checkpoint or f"step {int(state.step)} of {cfg.train.run_dir}"
            raise TrainingError(f"validation loss is {metrics['loss']} with the parameters of {where}: they "
                                "overflow (a diverged run); use an earlier checkpoint")
        _print0(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    elif ns.command == "generate":
        _generate(cfg, ns)
    elif ns.command == "plan":
        from deepseek_jax.plan import format_report, plan

        print(format_report(plan(cfg, ns.devices, compile=False if ns.lower_only else None, hbm_gib=ns.hbm_gib,
                                 headroom=0.1 if ns.headroom is None else ns.headroom)))
    return 0


def _generate(cfg, ns) -> None:
    """Completes --prompt texts (the config's sample prompts without them; the media alone with media
    and no prompt); with --image / --audio / --video each prompt runs alone, after its media."""
    from deepseek_jax.generate import sample
    from deepseek_jax.generate_media import media_record, sample_media

    prompts = _prompts(cfg, ns)  # before the (slow) checkpoint load
    records = [media_record(p, ns.media) for p in prompts] if ns.media else []
    s, state = _load(cfg, ns.checkpoint)
    variables, stats = {"params": state.params, "router": state.router}, {}
    if ns.media:
        texts = [sample_media(s.program.model, variables, s.tokenizer, r, max_new_tokens=ns.max_new_tokens,
                              temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed + i,
                              speculative=ns.speculative, stats=stats) for i, r in enumerate(records)]
        shown = " ".join(f"--{kind} {path}" for kind, path in ns.media) + " "
    else:
        texts = sample(s.program.model, variables, s.tokenizer, prompts, ns.max_new_tokens, ns.temperature,
                       ns.top_p, ns.seed, ns.speculative, stats, ns.prefill_chunk)
        shown = ""
    for p, text in zip(prompts, texts):
        _print0(f"--- {shown}{p!r}\n{p}{text}")
    if ns.speculative:
        _print0(f"speculative: acceptance rate {stats['acceptance_rate']:.3f}, "
                f"{stats['accepted_per_step']:.2f} of {stats['drafted'] // max(stats['steps'], 1)} drafts "
                f"accepted per step ({stats['steps']} steps)")


def _prompts(cfg, ns) -> list[str]:
    """The prompts `generate` completes, checked against the model (an InputError or DataError naming the flag):
    one at least, none empty without media, room for new tokens, media files there and of modalities it takes."""
    from deepseek_jax.data import DataError
    from deepseek_jax.generate_media import check_modalities, media_record
    from deepseek_jax.inspect_model import InputError

    m = cfg.model
    if ns.max_new_tokens >= m.max_seq_len:
        raise InputError(f"--max-new-tokens {ns.max_new_tokens} leaves no room for a prompt in "
                         f"model.max_seq_len={m.max_seq_len}")
    if ns.speculative and m.dspark is None:
        raise InputError("--speculative drafts with DSpark, and the model has none (model.dspark)")
    if ns.media:
        check_modalities(m, media_record(ns.prompt[0] if ns.prompt else "", ns.media))
        for kind, path in ns.media:
            if not Path(path).is_file():
                raise DataError(f"--{kind} {path}: no such file")
        return ns.prompt or [""]
    prompts = ns.prompt or list(cfg.train.sample_prompts)
    if not prompts:
        raise InputError("generate needs a prompt: give --prompt TEXT (the config has no train.sample_prompts)")
    if "" in prompts:
        raise InputError("--prompt '' is empty: give some text, or media with --image / --audio / --video")
    return prompts


def _load(cfg, checkpoint: str | None, data_check: bool = False):
    """(session, state with .params / .router) of a run's latest checkpoint or a converted one (data_check:
    warn when the run's data stream changed since training, for eval)."""
    from types import SimpleNamespace

    from deepseek_jax.run import load_converted, load_trained

    if checkpoint is None:
        return load_trained(cfg, data_check=data_check)
    if not cfg.data.tokenizer:  # a tokenizer trained here would not be the model's
        raise ConfigError(f"{checkpoint} has no tokenizer.json (its source had none): give the model's own with "
                          "data.tokenizer=path/to/tokenizer.json")
    s, variables = load_converted(cfg, checkpoint)
    return s, SimpleNamespace(**variables)


def _convert(ns) -> int:
    from deepseek_jax.convert.exporter import export_checkpoint
    from deepseek_jax.convert.importer import import_checkpoint

    what, src, out = ns.args  # checked by _command
    if what == "import":
        out = import_checkpoint(src, out, dtype=ns.dtype)
        print(f"converted: {out}\n  generate: deepseek-jax generate --checkpoint {out} --prompt '...'\n"
              f"  fine-tune: deepseek-jax train {out}/config.yaml data.source=...")
    else:
        out = export_checkpoint(src, out, layout=ns.layout, quant=ns.quant, dtype=ns.dtype,
                                max_shard_bytes=int(ns.max_shard_gb * 2**30))
        print(f"exported: {out}")
    return 0


def _run(ns) -> int:
    """Checks the flags, sets up JAX's devices and processes, runs the command."""
    _check_flags(ns)
    if ns.cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", ns.cpu_devices)
    if ns.distributed or ns.coordinator or ns.num_processes is not None or ns.process_id is not None:
        import jax

        jax.distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)
    return _dispatch(ns)


def _expected(e: Exception) -> bool:
    """Whether `e` is bad input or an expected failure (exit 2), not a bug: the project's errors, the file
    system's (OSError: missing, unreadable, a full disk, ...) and Orbax / TensorStore's ValueErrors."""
    from deepseek_jax.checkpoint import CheckpointError
    from deepseek_jax.convert.errors import ConversionError
    from deepseek_jax.data import DataError
    from deepseek_jax.inspect_model import InputError
    from deepseek_jax.multihost import ProcessError
    from deepseek_jax.plan import PlanError
    from deepseek_jax.run import TrainingError

    project = (CheckpointError, ConfigError, ConversionError, DataError, InputError, PlanError, ProcessError,
               TrainingError)
    if isinstance(e, (*project, OSError)):
        return True
    if isinstance(e, RuntimeError) and RUNTIME.match(str(e)):  # XLA out of memory, a lost coordinator
        return True
    return isinstance(e, ValueError) and (STATUS.match(str(e)) is not None or _raised_in(e, ("orbax", "tensorstore")))


def _raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the traceback of `e` passes through one of these top-level packages."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").partition(".")[0] in packages:
            return True
        tb = tb.tb_next
    return False


def _one_line(e: BaseException) -> str:
    """The message of `e` on one line (newlines folded; TensorStore's appended JSON spec dropped)."""
    return " ".join(TS_SPEC.sub("", str(e)).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit code (module docstring). `--debug` re-raises any error instead."""
    ns = _parser().parse_intermixed_args(argv)  # overrides may follow options
    try:
        return _run(ns)
    except KeyboardInterrupt:
        if ns.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if ns.debug:
            raise
        code, message = _report(e)
        print(f"error: {message}", file=sys.stderr)
        return code


def _report(e: Exception) -> tuple[int, str]:
    """(exit code, one-line message) of the error that ended a command: 2 expected, 1 a bug."""
    if isinstance(e, yaml.YAMLError):
        return 2, f"not valid YAML: {_one_line(e)}"
    if _expected(e):
        return 2, _one_line(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return 1, f"internal error ({type(e).__name__}: {first}); rerun with --debug for the traceback"
