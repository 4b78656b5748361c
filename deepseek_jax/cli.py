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
            a family writes: V3 / V4 hf (default), official; V4.1 official (default), hf_text; `--quant fp8`
            on V4.1, or `release`: the release's dtypes and blocks per tensor, FP8 32×32 / FP4 experts)
--checkpoint DIR (eval, generate): a converted checkpoint's weights and config instead of a run's.
--mesh FILE merges a mesh file last; --cpu-devices N gives JAX N fake CPU devices (try meshes on a CPU).
No logic lives here: each command calls one library function.
"""

import argparse
import sys
from pathlib import Path

from deepseek_jax.config import ConfigError, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "train" / "tiny_v4_stdlib.yaml"
COMMANDS = ("train", "eval", "generate", "inspect", "config", "plot", "plan", "convert")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek-jax", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="train", choices=COMMANDS)
    p.add_argument("args", nargs="*", help="config YAML files, then a.b=value overrides (plot: RUN_DIR)")
    p.add_argument("--prompt", action="append", help="generate: a prompt (repeatable)")
    for kind, what in (("image", "an image file"), ("audio", "a WAV file"), ("video", "a GIF (video)")):
        p.add_argument(f"--{kind}", dest="media", action="append", type=_media_kind(kind), metavar="PATH",
                       help=f"generate: {what} for every prompt, at its <{kind}> marker or else before its text "
                            "(repeatable; media in flag order)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--speculative", action="store_true",
                   help="generate: greedy decoding with DSpark drafts (V4.1), printing the acceptance rate")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="generate: prompt tokens per prefill call (default 4096; 0 = the whole prompt at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=2, help="inspect: batch size")
    p.add_argument("--seq-len", type=int, default=64, help="inspect: sequence length")
    p.add_argument("--mesh", help="a mesh YAML merged after the config files")
    p.add_argument("--devices", type=int, help="plan: devices to plan for (default: those present)")
    p.add_argument("--lower-only", action="store_true", help="plan: do not compile; estimate collectives")
    p.add_argument("--cpu-devices", type=int, help="fake CPU devices for JAX (set before it starts)")
    p.add_argument("--checkpoint", help="eval / generate: a converted checkpoint directory (convert import OUT)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="convert: stored parameter dtype (import) / tensor dtype (export)")
    p.add_argument("--layout", choices=("hf", "official", "hf_text"),
                   help="convert export: tensor names (default: the family's first, hf; V4.1 official)")
    p.add_argument("--quant", choices=("none", "fp8", "release"), default="none",
                   help="convert export: fp8 = the FP8 block weights of the releases (V3 / V4 128×128; V4.1 as "
                        "released, FP4 experts included); release = as released (V4.1 only)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="convert export: safetensors shard size")
    p.add_argument("--distributed", action="store_true",
                   help="multi-process: jax.distributed.initialize() detects coordinator, process count and id "
                        "(Cloud TPU, SLURM, Open MPI, Kubernetes); or give the three flags below")
    p.add_argument("--coordinator", help="multi-process: coordinator address host:port")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p


def _media_kind(kind: str):
    """argparse type of --image / --audio / --video: (kind, path), all appended to one list in flag order."""
    def tag(path: str) -> tuple[str, str]:
        return kind, path
    tag.__name__ = kind
    return tag


def _config(args: list[str], mesh: str | None = None, checkpoint: str | None = None):
    args = args[1:] if args[:1] == ["show"] else args  # `config show CONFIG...` reads like `config CONFIG...`
    files = [a for a in args if "=" not in a]
    if checkpoint:  # a converted checkpoint's own config first; files and overrides given after it
        files = [str(Path(checkpoint).expanduser() / "config.yaml")] + files
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
        from deepseek_jax.metrics import plot_run

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
        from deepseek_jax.run import evaluate

        s, state = _load(cfg, ns.checkpoint)
        line = " ".join(f"{k} {v:.4g}" for k, v in evaluate(s, state).items())
        _print0(line)
    elif ns.command == "generate":
        _generate(cfg, ns)
    elif ns.command == "plan":
        from deepseek_jax.plan import format_report, plan

        print(format_report(plan(cfg, ns.devices, compile=False if ns.lower_only else None)))
    return 0


def _generate(cfg, ns) -> None:
    """Completes --prompt texts (the config's sample prompts without them; the media alone with media
    and no prompt); with --image / --audio / --video each prompt runs alone, after its media."""
    from deepseek_jax.data import DataError
    from deepseek_jax.generate import sample
    from deepseek_jax.generate_media import check_modalities, media_record, sample_media

    records = [media_record(p, ns.media) for p in ns.prompt or [""]] if ns.media else []
    for record in records[:1]:  # before the (slow) checkpoint load; corrupt files fail at encoding
        check_modalities(cfg.model, record)
    for kind, path in ns.media or ():
        if not Path(path).is_file():
            raise DataError(f"--{kind} {path}: no such file")
    s, state = _load(cfg, ns.checkpoint)
    variables, stats = {"params": state.params, "router": state.router}, {}
    if ns.media:
        prompts = ns.prompt or [""]
        texts = [sample_media(s.program.model, variables, s.tokenizer, r, max_new_tokens=ns.max_new_tokens,
                              temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed + i,
                              speculative=ns.speculative, stats=stats) for i, r in enumerate(records)]
        shown = " ".join(f"--{kind} {path}" for kind, path in ns.media) + " "
    else:
        prompts = ns.prompt or list(cfg.train.sample_prompts)
        texts = sample(s.program.model, variables, s.tokenizer, prompts, ns.max_new_tokens, ns.temperature,
                       ns.top_p, ns.seed, ns.speculative, stats, ns.prefill_chunk)
        shown = ""
    for p, text in zip(prompts, texts):
        _print0(f"--- {shown}{p!r}\n{p}{text}")
    if ns.speculative:
        _print0(f"speculative: acceptance rate {stats['acceptance_rate']:.3f}, "
                f"{stats['accepted_per_step']:.2f} of {stats['drafted'] // max(stats['steps'], 1)} drafts "
                f"accepted per step ({stats['steps']} steps)")


def _load(cfg, checkpoint: str | None):
    """(session, state with .params / .router) of a run's latest checkpoint or a converted one."""
    from types import SimpleNamespace

    from deepseek_jax.run import load_converted, load_trained

    if checkpoint is None:
        return load_trained(cfg)
    if not cfg.data.tokenizer:  # a tokenizer trained here would not be the model's
        raise ConfigError(f"{checkpoint} has no tokenizer.json (its source had none): give the model's own with "
                          "data.tokenizer=path/to/tokenizer.json")
    s, variables = load_converted(cfg, checkpoint)
    return s, SimpleNamespace(**variables)


def _convert(ns) -> int:
    from deepseek_jax.convert.exporter import export_checkpoint
    from deepseek_jax.convert.importer import import_checkpoint

    if len(ns.args) != 3 or ns.args[0] not in ("import", "export"):
        print("usage: deepseek-jax convert import SRC OUT | convert export CKPT OUT [--layout hf|official|hf_text] "
              "[--quant none|fp8|release]", file=sys.stderr)
        return 2
    what, src, out = ns.args
    if what == "import":
        out = import_checkpoint(src, out, dtype=ns.dtype)
        print(f"converted: {out}\n  generate: deepseek-jax generate --checkpoint {out} --prompt '...'\n"
              f"  fine-tune: deepseek-jax train {out}/config.yaml data.source=...")
    else:
        out = export_checkpoint(src, out, layout=ns.layout, quant=ns.quant, dtype=ns.dtype,
                                max_shard_bytes=int(ns.max_shard_gb * 2**30))
        print(f"exported: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_intermixed_args(argv)  # overrides may follow options
    if ns.cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", ns.cpu_devices)
    if ns.distributed or ns.coordinator or ns.num_processes is not None or ns.process_id is not None:
        import jax

        jax.distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)
    from deepseek_jax.checkpoint import CheckpointError
    from deepseek_jax.convert.errors import ConversionError
    from deepseek_jax.data import DataError
    from deepseek_jax.inspect_model import InputError
    from deepseek_jax.multihost import ProcessError
    from deepseek_jax.plan import PlanError
    from deepseek_jax.run import TrainingError

    try:
        return _dispatch(ns)
    except (CheckpointError, ConfigError, ConversionError, DataError, InputError, PlanError, ProcessError,
            TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
