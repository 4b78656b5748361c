"""Invariants across config sections, in one place; the loader runs them on every Config it builds.

A section's own invariants live in its `__post_init__`. Here are only rules that read two sections and
need nothing but the config (no devices, files or platform): checks that need the mesh's resolved
size, the tokenizer file or the backend stay where that is known (sharding.py, tokenizer.py,
layers/moe/dispatch.py, run.py).
"""

from collections.abc import Callable

from deepseek_jax.config.errors import ConfigError
from deepseek_jax.config.run import Config


def _seq_len_fits(cfg: Config) -> str | None:
    d, m = cfg.data, cfg.model
    if d.seq_len > m.max_seq_len:
        return f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
    return None


# (the keys a rule reads, for the error's "from" part; the rule: None when it holds, else the message)
CHECKS: tuple[tuple[tuple[str, ...], Callable[[Config], str | None]], ...] = (
    (("data.seq_len", "model.max_seq_len"), _seq_len_fits),
)


def check_config(cfg: Config, origin: dict[str, str] | None = None) -> Config:
    """Raises ConfigError for the first cross-section rule `cfg` breaks, naming the keys' sources."""
    origin = origin or {}
    for keys, rule in CHECKS:
        msg = rule(cfg)
        if msg is not None:
            where = ", ".join(f"{k} from {origin.get(k, 'the default')}" for k in keys)
            raise ConfigError(f"{msg} ({where})")
    return cfg
