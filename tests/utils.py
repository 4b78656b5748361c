"""Shared test helpers: repository paths, tolerances (STYLE.md §6), a closeness check that reports its
errors, the numpy comparisons the parity tests share (KL of logits, router top-k margins, sown values
per layer), the fusing of per-expert checkpoint tensors into transformers' in-memory layout, and small
fixtures' files (a checkpoint directory, a WAV, a whitespace word-level tokenizer)."""

import io
import json
import re
import wave
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository
CONFIGS = ROOT / "configs"
# configs/model/tiny_v4.yaml narrowed: window 8 and HCA ratio 16, so that T = 40 crosses windows and
# blocks of both compressors; index_topk 4 < the 10 CSA entries at T = 40 (tests/models/test_model_v4.py
# and test_quant_wiring.py, which shares its float forward's compile through the persistent cache)
TINY_V4_OVERRIDES = ["model." + o for o in (
    "v4.window_size=8", "v4.index_topk=4", "vocab_size=256", "dim=64", "moe.n_routed_experts=8",
    "moe.n_activated_experts=2", "moe.moe_inter_dim=32", "v4.q_lora_rank=32", "v4.head_dim=32",
    "v4.rope_head_dim=8", "v4.o_lora_rank=16", "v4.index_head_dim=16", "max_seq_len=64")]

# (rtol, atol) per kind of comparison; a looser tolerance in a test carries a comment naming why.
TOL = {
    "resharded_f32": {"rtol": 1e-5, "atol": 1e-6},  # same f32 math on a different mesh
    "layer_f32": {"rtol": 1e-5, "atol": 1e-5},  # pure fn vs numpy f64; layer vs reference (f32)
    "model_f32": {"rtol": 1e-4, "atol": 1e-4},  # tiny-model logits and grads vs reference (f32)
    "bf16": {"rtol": 2e-2, "atol": 2e-2},  # bf16 compute vs f32 reference
}


def assert_close(got, want, rtol: float, atol: float, what: str = "value") -> None:
    """|got - want| <= atol + rtol * |want| elementwise; the failure names max abs and rel error."""
    got = np.asarray(np.asarray(got, dtype=np.float64))
    want = np.asarray(np.asarray(want, dtype=np.float64))
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    assert np.all(np.isfinite(got)) or not np.all(np.isfinite(want)), f"{what}: non-finite values"
    err = np.abs(got - want)
    bad = ~(err <= atol + rtol * np.abs(want))
    if bad.any():
        rel = err / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
        worst = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} elements out of tolerance (rtol={rtol}, atol={atol}); "
            f"max abs err {err.max():.3e} at {tuple(int(i) for i in worst)} "
            f"(got {got[worst]:.6e}, want {want[worst]:.6e}); max rel err {rel.max():.3e}"
        )


def assert_close_to_scale(got, want, rtol: float, what: str = "value") -> None:
    """max |got - want| <= rtol * max |want|: for sums (gradients) that another layout reorders,
    where an element-wise rtol is meaningless for the near-cancelling entries."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 1.0
    scale = scale or 1.0
    assert_close(np.asarray(got, dtype=np.float64) / scale, want / scale, rtol=rtol, atol=rtol,
                 what=f"{what} / max|{what.split(':')[-1].strip()}|")


def per_layer(tree, cfg, *path) -> list:
    """The value at `path` in every main-model layer, in layer order (`by_layer`'s values)."""
    found = by_layer(tree, cfg, *path)
    return [found[layer] for layer in sorted(found)]


def by_layer(tree, cfg, *path) -> dict:
    """{layer: the value at `path`} for the main-model layers that have it, from a scanned variable or
    intermediates tree (segments `layers_a_b`, slots `block_k`, leading [repeats] axis). A sown
    intermediate is a 1-tuple: end the path with 0."""
    from deepseek_jax.models import layer_kinds, layer_segments

    found = {}
    for seg in layer_segments(layer_kinds(cfg)):
        for k in range(len(seg.kinds)):
            node = tree.get(seg.name, {}).get(f"block_{k}")
            for key in path:
                node = None if node is None or (isinstance(node, dict) and key not in node) else node[key]
            if node is not None:
                found.update({layer: node[r] for r, layer in enumerate(seg.layers(k))})
    return found


def log_softmax(x):
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def kl(p_logits, q_logits):
    """KL(p ‖ q) per row of two logit arrays, in float64."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def router_topk_margin(choice_ME, k, n_groups, topk_group):
    """Smallest gap at the group cut and at the expert cut of group-limited top-k routing (the
    selection is stable above it)."""
    M, E = choice_ME.shape
    groups = np.sort(choice_ME.reshape(M, n_groups, -1), -1)[..., -2:].sum(-1)
    g_sorted = np.sort(groups, -1)[:, ::-1]
    g_margin = (g_sorted[:, topk_group - 1] - g_sorted[:, topk_group]).min()
    kept = np.argsort(-groups, -1)[:, :topk_group]
    mask = np.zeros((M, n_groups), bool)
    np.put_along_axis(mask, kept, True, -1)
    masked = np.where(np.repeat(mask, E // n_groups, -1), choice_ME, -np.inf)
    e_sorted = np.sort(masked, -1)[:, ::-1]
    return min(g_margin, (e_sorted[:, k - 1] - e_sorted[:, k]).min())


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert `...experts.{e}.{gate,up,down}_proj.weight` -> transformers' in-memory fused
    `...experts.gate_up_proj` [E, 2F, D] (gate rows first) and `...experts.down_proj` [E, D, F]: the
    inverse of convert/source.py `split_fused`. Other tensors pass through unchanged."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for name, a in state.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name] = a
        else:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = a
    for prefix, parts in experts.items():
        n = len(parts.get("gate", {}))
        for kind in ("gate", "up", "down"):
            have = sorted(parts.get(kind, {}))
            assert have == list(range(n)), f"{prefix}: {kind}_proj for experts {have}, want 0..{n - 1}"
        gate, up, down = (np.stack([parts[kind][e] for e in range(n)]) for kind in ("gate", "up", "down"))
        out[f"{prefix}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        out[f"{prefix}.down_proj"] = down
    return out


def write_checkpoint(directory: Path, tensors: dict, config: dict, max_shard_bytes: int = 400_000) -> Path:
    """Sharded safetensors (scales in other shards than some weights) + `config` as config.json."""
    from deepseek_jax.convert.safetensors import dtype_name, write_sharded

    directory.mkdir(parents=True)
    specs = [(n, dtype_name(a.dtype), a.shape) for n, a in tensors.items()]
    write_sharded(directory, specs, tensors.__getitem__, max_shard_bytes=max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def wav_bytes(pcm, rate: int, width: int = 2, channels: int = 1) -> bytes:
    """A PCM WAV file's bytes: `pcm` an integer sample array (written as stored) or raw frame bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm if isinstance(pcm, bytes) else np.asarray(pcm).tobytes())
    return buf.getvalue()


def whitespace_words(vocab: dict[str, int]):
    """A word-level `tokenizers.Tokenizer` over `vocab` that splits on whitespace (`<unk>` otherwise)."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tok


def random_variables(cfg, seed: int = 0) -> tuple[dict, dict]:
    """(abstract, random N(0, 1) float32 variables) of a model config, Engram tables' padding rows zero
    as the model initialises them (a converter round trip drops them)."""
    import jax

    from deepseek_jax.convert import table
    from deepseek_jax.convert.importer import abstract_variables

    rng = np.random.default_rng(seed)
    abstract = abstract_variables(cfg)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    for j, layer in enumerate(cfg.engram.layer_ids if cfg.engram else ()):
        leaf = next(p for p, _ in table.iter_leaves(variables) if p[-1] == "table" and p[1] == f"layers_{layer}")
        table.get_leaf(variables, leaf)[:, cfg.engram.num_embeddings[j]:] = 0
    return abstract, variables


def read_safetensors_dir(directory) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint directory (sharded or one file), by name."""
    from deepseek_jax.convert.safetensors import SafetensorsDir

    with SafetensorsDir(directory) as sd:
        return {n: np.array(sd.read(n)) for n in sd.names()}


def assert_trees_equal(got, want) -> None:
    """Same tree structure and bit-identical leaves."""
    import jax

    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
