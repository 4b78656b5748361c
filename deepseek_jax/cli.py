"""Command line: `deepseek-jax COMMAND CONFIG... [a.b=value ...]` (also `python -m deepseek_jax`).

Commands:
  train     train (or resume) a run; the default command, on the embedded default config
  eval      held-out loss and perplexity of a run's latest checkpoint
  generate  complete prompts with a run's latest checkpoint (--prompt, repeatable)
  inspect   build the model, print its parameter table and run a forward pass
  config    print the resolved config as YAML (`config show CONFIG...` also works)
  plot      write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl
No logic lives here: each command calls one library function.
"""

import argparse
import sys
from pathlib import Path

from deepseek_jax.config import ConfigError, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "train" / "tiny_stdlib.yaml"
COMMANDS = ("train", "eval", "generate", "inspect", "config", "plot")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek-jax", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="train", choices=COMMANDS)
    p.add_argument("args", nargs="*", help="config YAML files, then a.b=value overrides (plot: RUN_DIR)")
    p.add_argument("--prompt", action="append", help="generate: a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=2, help="inspect: batch size")
    p.add_argument("--seq-len", type=int, default=64, help="inspect: sequence length")
    p.add_argument("--coordinator", help="multi-process: coordinator address host:port")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p


def _config(args: list[str]):
    args = args[1:] if args[:1] == ["show"] else args  # `config show CONFIG...` reads like `config CONFIG...`
    files = [a for a in args if "=" not in a] or [str(DEFAULT_CONFIG)]
    return load_config(files, [a for a in args if "=" in a])


def _dispatch(ns) -> int:
    if ns.command == "plot":
        from deepseek_jax.metrics import plot_run

        print(plot_run(ns.args[0] if ns.args else "runs/tiny_stdlib"))
        return 0
    cfg = _config(ns.args)
    if ns.command == "config":
        print(to_yaml(cfg), end="")
    elif ns.command == "inspect":
        from deepseek_jax.inspect_model import inspect

        inspect(cfg.model, batch=ns.batch, seq_len=ns.seq_len, seed=cfg.train.seed)
    elif ns.command == "train":
        from deepseek_jax.run import run

        run(cfg)
    elif ns.command == "eval":
        from deepseek_jax.run import evaluate, load_trained

        s, state = load_trained(cfg)
        print(" ".join(f"{k} {v:.4g}" for k, v in evaluate(s, state).items()))
    elif ns.command == "generate":
        from deepseek_jax.run import load_trained, sample

        s, state = load_trained(cfg)
        prompts = ns.prompt or list(cfg.train.sample_prompts)
        for p, text in zip(prompts, sample(s, state, prompts, ns.max_new_tokens, ns.temperature, ns.top_p, ns.seed)):
            print(f"--- {p!r}\n{p}{text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.coordinator or ns.num_processes:
        import jax

        jax.distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)
    from deepseek_jax.data import DataError
    from deepseek_jax.inspect_model import InputError
    from deepseek_jax.run import TrainingError

    try:
        return _dispatch(ns)
    except (ConfigError, DataError, InputError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
