"""Invariants across config sections, in one place; the loader runs them on every Config it builds.

A section's own invariants live in its `__post_init__`. Here are only rules that read two sections and
need nothing but the config (no devices, files or platform): checks that need the mesh's resolved
size, the tokenizer file or the backend stay where that is known (sharding.py, tokenizer.py,
layers/moe/dispatch.py, run.py).
"""

from collections.abc import Callable

from deepseek_jax.config.errors import ConfigError
from deepseek_jax.config.model import MEDIA_TOKEN_FIELDS
from deepseek_jax.config.run import DEMO_SOURCE, Config


def _seq_len_fits(cfg: Config) -> str | None:
    d, m = cfg.data, cfg.model
    if d.seq_len > m.max_seq_len:
        return f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
    return None


def _targets_fit(seq_len: int, key: str, furthest: int) -> str | None:
    """Position t predicts t + k (losses.next_token_targets): a row of T tokens has targets for k <= T - 1."""
    if seq_len > furthest:
        return None
    return (f"data.seq_len={seq_len} leaves no target for {key} (its furthest target is {furthest} tokens ahead): "
            f"needs data.seq_len >= {furthest + 1}")


def _mtp_targets_fit(cfg: Config) -> str | None:
    """MTP depth d (1 … K) predicts d + 1 tokens ahead (DSpark stages: `_dspark_targets_fit`)."""
    K = cfg.model.num_nextn_predict_layers
    if cfg.model.dspark is not None or K == 0:
        return None
    return _targets_fit(cfg.data.seq_len, f"model.num_nextn_predict_layers={K}", K + 1)


def _dspark_targets_fit(cfg: Config) -> str | None:
    """DSpark's slots z < block_size predict z + 2 tokens ahead, at every stage."""
    ds = cfg.model.dspark
    return None if ds is None else _targets_fit(cfg.data.seq_len, f"model.dspark.block_size={ds.block_size}",
                                                ds.block_size + 1)


def _media_has_model(cfg: Config) -> str | None:
    m = cfg.model
    if cfg.data.media is not None and m.vision is None and m.audio is None:
        return "data.media (interleaved media records) needs a model with model.vision, model.video or model.audio"
    return None


def _image_budgets_fit(cfg: Config) -> str | None:
    """Any image the processor makes (span h·(w + 1) + 2 <= vision.max_image_tokens: up to N - 3 aligner rows,
    1 x (N - 3) at the extreme) must fit the budgets whenever its span fits a row."""
    media, vision = cfg.data.media, cfg.model.vision
    if media is None or vision is None:
        return None
    rows = max(min(vision.max_image_tokens, cfg.data.seq_len) - 3, 0)
    got = media.budgets(cfg.model, cfg.data.seq_len)
    r2 = vision.downsample_ratio**2
    if got["max_image_rows"] < rows:
        return (f"data.media.max_image_rows={got['max_image_rows']} is below {rows}, the aligner rows an image "
                f"may take when its span fits a row (min(model.vision.max_image_tokens, data.seq_len) - 3)")
    if got["max_patches"] < r2 * rows:
        return (f"data.media.max_patches={got['max_patches']} is below {r2 * rows} = r² x {rows}, the ViT patches "
                "an image may take when its span fits a row")
    return None


def _placeholders_not_text(cfg: Config) -> str | None:
    """A BPE trained here owns ids 0 … tokenizer_vocab_size - 1: a placeholder there would also be text."""
    m, d = cfg.model, cfg.data
    if d.media is None or d.tokenizer or d.source == DEMO_SOURCE:
        return None
    ids = {MEDIA_TOKEN_FIELDS[kind]: v for kind, v in m.media_token_ids().items()}
    bad = {k: v for k, v in ids.items() if v < d.tokenizer_vocab_size}
    if bad:
        return (f"media placeholder ids {bad} fall inside the BPE trained on the data "
                f"(data.tokenizer_vocab_size={d.tokenizer_vocab_size}): use ids >= it, or a data.tokenizer")
    return None


# (the keys a rule reads, for the error's "from" part; the rule: None when it holds, else the message)
CHECKS: tuple[tuple[tuple[str, ...], Callable[[Config], str | None]], ...] = (
    (("data.seq_len", "model.max_seq_len"), _seq_len_fits),
    (("data.seq_len", "model.num_nextn_predict_layers"), _mtp_targets_fit),
    (("data.seq_len", "model.dspark.block_size"), _dspark_targets_fit),
    (("data.media", "model.vision", "model.audio"), _media_has_model),
    (("data.media.max_image_rows", "data.media.max_patches", "model.vision.max_image_tokens", "data.seq_len"),
     _image_budgets_fit),
    (("model.vision.image_token_id", "model.video.video_token_id", "model.audio.audio_token_id",
      "data.tokenizer_vocab_size"), _placeholders_not_text),
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
