"""Command line: `deepseek-jax COMMAND CONFIG... [a.b=value ...]` (also `python -m deepseek_jax`).

Commands:
  inspect   build the model, print its parameter table and run a forward pass (the default)
  config    print the resolved config as YAML
No logic lives here: each command calls one library function.
"""

import argparse
import sys
from pathlib import Path

from deepseek_jax.config import ConfigError, load_config, to_yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in items if "=" in a]
    files = [a for a in items if "=" not in a] or [str(DEFAULT_CONFIG)]
    return files, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-jax", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="inspect", choices=["inspect", "config"])
    parser.add_argument("args", nargs="*", help="config YAML files, then a.b=value overrides")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    ns = parser.parse_args(argv)
    files, overrides = _split_args(ns.args)
    try:
        cfg = load_config(files, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if ns.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    from deepseek_jax.inspect_model import InputError, inspect

    try:
        inspect(cfg.model, batch=ns.batch, seq_len=ns.seq_len, seed=cfg.train.seed)
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    return 0
