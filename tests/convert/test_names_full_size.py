"""Full-size name and shape coverage without downloads: DeepSeek-V3 671B, V3.2, V4-Flash and V4-Pro.

For each full-size config (configs/model/*.yaml) this checks, with nothing allocated:
- transformers' model built on the `meta` device: every in-memory tensor name and shape (fused
  experts split per expert) equals our layout "hf" (V3 / V3.2) or "hf_memory" (V4) names and
  `expected_shape` (MTP left out: transformers has none);
- the names transformers' `save_pretrained` writes (its `revert_weight_conversion` applied to the meta
  state dict) equal our layout "hf"; on tiny models, a real `save_pretrained` writes exactly those;
- the official names and shapes against the reference tables (shared/reference/
  deepseek_v4_architecture.md §1.13 for V4, checkpoint_formats.md §2 for V3), every layer of each
  kind, and the released tensor totals (V3 91,991 and V4-Flash 69,187, scales included);
- a bijection per layout: names unique, every slice of every one of our parameters filled by exactly
  one entry (element counts equal), and official <-> hf (<-> hf_memory) names paired entry by entry.
"""

import dataclasses
import functools
import itertools
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.core_model_loading import revert_weight_conversion

from deepseek_jax.config import load_model_config
from deepseek_jax.convert import table, v3, v4
from deepseek_jax.convert.importer import abstract_variables, expected_shape
from deepseek_jax.convert.source import split_fused
from tests.parity.test_parity_v4 import HF_CONFIG as V4_PARITY_CONFIG

pytestmark = pytest.mark.parity

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
CONFIGS = {  # key -> (yaml, family module, layout of transformers' in-memory names)
    "v3_671b": ("deepseek_v3_671b.yaml", v3, "hf"),
    "v32_671b": ("deepseek_v32_671b.yaml", v3, "hf"),
    "v4_flash": ("deepseek_v4_flash.yaml", v4, "hf_memory"),
    "v4_pro": ("deepseek_v4_pro.yaml", v4, "hf_memory"),
}
# V4-Pro (1.6T parameters, 73K tensors) is the costliest of each check (3-9 s alone): `slow`
SLOW = pytest.mark.slow
KEYS = [pytest.param(k, marks=SLOW) if k == "v4_pro" else k for k in CONFIGS]
V4_KEYS = ["v4_flash", pytest.param("v4_pro", marks=SLOW)]
# state-dict entries that are not checkpoint tensors (non-persistent rope tables, if ever listed)
NOT_IN_CHECKPOINT = re.compile(r"(^|\.)\w*inv_freq$")


# ----------------------------------------------------------------------------------------------
# Shared, cached per config (each is built once for the whole module)
# ----------------------------------------------------------------------------------------------


@functools.cache
def _cfg(key: str, mtp: bool = True):
    cfg = load_model_config([MODEL_DIR / CONFIGS[key][0]])
    if mtp:
        return cfg
    extra = {"compress_ratios": cfg.compress_ratios[: cfg.n_layers]} if cfg.v4 is not None else {}
    return dataclasses.replace(cfg, num_nextn_predict_layers=0, **extra)


@functools.cache
def _ours(key: str, mtp: bool = True):
    """(cfg, entries, abstract variables, checkpoint shape of each entry)."""
    cfg = _cfg(key, mtp)
    ents = table.entries(CONFIGS[key][1].FAMILY, cfg)
    abstract = abstract_variables(cfg)
    return cfg, ents, abstract, [expected_shape(e, abstract, cfg) for e in ents]


def _named(key: str, layout: str, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    _, ents, _, shapes = _ours(key, mtp)
    out = {e.name(layout): s for e, s in zip(ents, shapes)}
    assert len(out) == len(ents), f"{key} {layout}: duplicate names"
    return out


def _rss_bytes() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


@functools.cache
def _meta_model(key: str):
    """transformers' model of the full-size config on the meta device (config from our config_to_json):
    (model, seconds to build, resident-memory growth in bytes or None)."""
    fam = CONFIGS[key][1].FAMILY
    hf_config = transformers.AutoConfig.for_model(**fam.config_to_json(_cfg(key)))
    rss0, t0 = _rss_bytes(), time.perf_counter()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    seconds = time.perf_counter() - t0
    rss1 = _rss_bytes()
    return model, seconds, None if rss0 is None or rss1 is None else rss1 - rss0


def _meta_state(key: str) -> dict:
    model = _meta_model(key)[0]
    return {k: v for k, v in model.state_dict().items() if not NOT_IN_CHECKPOINT.search(k)}


def _diff(a: dict, b: dict, what: str, a_is: str = "theirs", b_is: str = "ours") -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = sorted((n, a[n], b[n]) for n in set(a) & set(b) if tuple(a[n]) != tuple(b[n]))
    return (
        f"{what}: only {a_is} {only_a[:8]} ({len(only_a)}), only {b_is} {only_b[:8]} ({len(only_b)}), "
        f"shape ({a_is}, {b_is}) {shapes[:8]} ({len(shapes)})"
    )


# ----------------------------------------------------------------------------------------------
# 1. transformers' in-memory model (meta device) vs our "hf" / "hf_memory" names and shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_meta_model_allocates_nothing(key):
    model, seconds, grew = _meta_model(key)
    n_params = sum(p.numel() for p in model.parameters())
    on_meta = {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}
    assert on_meta == {"meta"}, on_meta
    assert seconds < 30, f"building the meta model took {seconds:.1f} s"
    if grew is not None:  # bf16 V4-Pro would be 3 TB; a meta model is Python objects only
        assert grew < 2 * 2**30, f"resident memory grew {grew / 2**30:.2f} GiB building {key}"
    # what transformers' model holds (MTP excluded) = ours without MTP, in elements
    _, _, _, shapes = _ours(key, mtp=False)
    assert sum(v.numel() for v in _meta_state(key).values()) == sum(math.prod(s) for s in shapes)
    assert (
        n_params
        > {"v3_671b": 6.7e11, "v32_671b": 6.7e11, "v4_flash": 2.8e11, "v4_pro": 1.5e12}[key]
    )


@pytest.mark.parametrize("key", KEYS)
def test_in_memory_names_and_shapes(key):
    state = _meta_state(key)
    buffers = {n.rsplit(".", 1)[-1] for n, _ in _meta_model(key)[0].named_buffers()} & {
        n.rsplit(".", 1)[-1] for n in state
    }
    assert buffers <= {"e_score_correction_bias", "tid2eid"}, buffers  # checkpoint buffers only
    if CONFIGS[key][1] is v4:
        assert any(n.endswith("mlp.gate.tid2eid") for n in state)
    # slicing meta tensors is free
    theirs = {n: tuple(t.shape) for n, t in split_fused(state).items()}
    ours = _named(key, CONFIGS[key][2], mtp=False)
    assert theirs == ours, _diff(theirs, ours, f"{key} in-memory ({CONFIGS[key][2]})")


# ----------------------------------------------------------------------------------------------
# 2. What transformers' save_pretrained writes vs our layout "hf"
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_saved_names_and_shapes(key):
    """save_pretrained writes `revert_weight_conversion(model, state_dict)`; on meta tensors the
    reverse converters (split / chunk of fused experts) allocate nothing."""
    model = _meta_model(key)[0]
    saved = revert_weight_conversion(model, _meta_state(key))
    theirs = {n: tuple(t.shape) for n, t in saved.items()}
    ours = _named(key, "hf", mtp=False)
    assert theirs == ours, _diff(theirs, ours, f"{key} saved by transformers")
    if CONFIGS[key][1] is v4:  # spot checks of the on-disk spelling (checkpoint_formats.md §3.4)
        for name in (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.hc_head.hc_fn",
            "head.weight",
            "model.layers.0.ffn.experts.0.w1.weight",
            "model.layers.2.attn.indexer.compressor.ape",
            "model.layers.0.hc_attn_fn",
            "model.layers.0.ffn.gate.tid2eid",
        ):
            assert name in theirs, name


# Tiny V4 with every path (tests/parity/test_parity_v4.py's), no MTP
HF_CONFIG_V4 = {**V4_PARITY_CONFIG, "num_nextn_predict_layers": 0}


def _tiny_hf_config(which: str) -> dict:
    if which == "v4":
        return {"model_type": "deepseek_v4", **HF_CONFIG_V4}
    cfg = load_model_config([MODEL_DIR / ("tiny.yaml" if which == "v3" else "tiny_v32.yaml")])
    return v3.FAMILY.config_to_json(dataclasses.replace(cfg, num_nextn_predict_layers=0))


@pytest.mark.parametrize("which", ["v4", "v3", "v32"])
def test_tiny_save_pretrained_writes_hf_names(which, tmp_path):
    safetensors = pytest.importorskip("safetensors")
    hf = _tiny_hf_config(which)
    fam = v4 if which == "v4" else v3
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    model.save_pretrained(tmp_path)
    theirs = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        with safetensors.safe_open(f, "np") as sf:
            names = list(sf.keys())
            theirs.update({n: tuple(sf.get_slice(n).get_shape()) for n in names})
    cfg = fam.FAMILY.config_from_json(json.loads((tmp_path / "config.json").read_text()))
    ents = table.entries(fam.FAMILY, cfg)
    abstract = abstract_variables(cfg)
    ours = {e.name("hf"): expected_shape(e, abstract, cfg) for e in ents}
    assert theirs == ours, _diff(theirs, ours, f"tiny {which} save_pretrained")


# ----------------------------------------------------------------------------------------------
# 3. Official names and shapes vs the reference tables; released tensor totals
# ----------------------------------------------------------------------------------------------

# deepseek_v4_architecture.md §1.13, one layer: (suffix, Flash shape, Flash scale, Pro shape, Pro scale).
# Scale None = stored unquantised. Routed experts: the table's packed FP4 shape [out, in/2] (I8) and
# E8M0 scale [out, in/32]; the logical shape our names carry doubles the last dim.
V4_ALL = [
    ("attn.wq_a.weight", (1024, 4096), (8, 32), (1536, 7168), (12, 56)),
    ("attn.q_norm.weight", (1024,), None, (1536,), None),
    ("attn.wq_b.weight", (32768, 1024), (256, 8), (65536, 1536), (512, 12)),
    ("attn.wkv.weight", (512, 4096), (4, 32), (512, 7168), (4, 56)),
    ("attn.kv_norm.weight", (512,), None, (512,), None),
    ("attn.wo_a.weight", (8192, 4096), (64, 32), (16384, 4096), (128, 32)),
    ("attn.wo_b.weight", (4096, 8192), (32, 64), (7168, 16384), (56, 128)),
    ("attn.attn_sink", (64,), None, (128,), None),
    ("attn_norm.weight", (4096,), None, (7168,), None),
    ("ffn_norm.weight", (4096,), None, (7168,), None),
    ("hc_attn_fn", (24, 16384), None, (24, 28672), None),
    ("hc_ffn_fn", (24, 16384), None, (24, 28672), None),
    ("hc_attn_base", (24,), None, (24,), None),
    ("hc_ffn_base", (24,), None, (24,), None),
    ("hc_attn_scale", (3,), None, (3,), None),
    ("hc_ffn_scale", (3,), None, (3,), None),
    ("ffn.gate.weight", (256, 4096), None, (384, 7168), None),
    ("ffn.shared_experts.w1.weight", (2048, 4096), (16, 32), (3072, 7168), (24, 56)),
    ("ffn.shared_experts.w3.weight", (2048, 4096), (16, 32), (3072, 7168), (24, 56)),
    ("ffn.shared_experts.w2.weight", (4096, 2048), (32, 16), (7168, 3072), (56, 24)),
]
V4_EXPERTS = [  # FP4, per expert j
    ("ffn.experts.{j}.w1.weight", (2048, 2048), (2048, 128), (3072, 3584), (3072, 224)),
    ("ffn.experts.{j}.w3.weight", (2048, 2048), (2048, 128), (3072, 3584), (3072, 224)),
    ("ffn.experts.{j}.w2.weight", (4096, 1024), (4096, 64), (7168, 1536), (7168, 96)),
]
V4_LEARNED = [("ffn.gate.bias", (256,), None, (384,), None)]
V4_HASH = [("ffn.gate.tid2eid", (129280, 6), None, (129280, 6), None)]
V4_CSA = [
    ("attn.compressor.wkv.weight", (1024, 4096), None, (1024, 7168), None),
    ("attn.compressor.wgate.weight", (1024, 4096), None, (1024, 7168), None),
    ("attn.compressor.ape", (4, 1024), None, (4, 1024), None),
    ("attn.compressor.norm.weight", (512,), None, (512,), None),
    ("attn.indexer.wq_b.weight", (8192, 1024), (64, 8), (8192, 1536), (64, 12)),
    ("attn.indexer.weights_proj.weight", (64, 4096), None, (64, 7168), None),
    ("attn.indexer.compressor.wkv.weight", (256, 4096), None, (256, 7168), None),
    ("attn.indexer.compressor.wgate.weight", (256, 4096), None, (256, 7168), None),
    ("attn.indexer.compressor.ape", (4, 256), None, (4, 256), None),
    ("attn.indexer.compressor.norm.weight", (128,), None, (128,), None),
]
V4_HCA = [
    ("attn.compressor.wkv.weight", (512, 4096), None, (512, 7168), None),
    ("attn.compressor.wgate.weight", (512, 4096), None, (512, 7168), None),
    ("attn.compressor.ape", (128, 512), None, (128, 512), None),
    ("attn.compressor.norm.weight", (512,), None, (512,), None),
]
# Globals and MTP extras (§1.13 prose: embed/head [129280, D], norm [D], hc_head_fn [4, 4D], base [4],
# scale [1]; MTP e_proj / h_proj FP8 [D, D], enorm / hnorm / norm [D], its own hc_head_*).
V4_GLOBAL = [
    ("embed.weight", (129280, 4096), None, (129280, 7168), None),
    ("head.weight", (129280, 4096), None, (129280, 7168), None),
    ("norm.weight", (4096,), None, (7168,), None),
    ("hc_head_fn", (4, 16384), None, (4, 28672), None),
    ("hc_head_base", (4,), None, (4,), None),
    ("hc_head_scale", (1,), None, (1,), None),
]
V4_MTP_EXTRA = [
    ("e_proj.weight", (4096, 4096), (32, 32), (7168, 7168), (56, 56)),
    ("h_proj.weight", (4096, 4096), (32, 32), (7168, 7168), (56, 56)),
    ("enorm.weight", (4096,), None, (7168,), None),
    ("hnorm.weight", (4096,), None, (7168,), None),
    ("norm.weight", (4096,), None, (7168,), None),
    ("hc_head_fn", (4, 16384), None, (4, 28672), None),
    ("hc_head_base", (4,), None, (4,), None),
    ("hc_head_scale", (1,), None, (1,), None),
]
V4_FP4 = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")


def _v4_reference_kind(key: str, layer: int) -> tuple[str, bool]:
    """(attention kind, hash-routed) per §1.1's layer schedule (not read from our config)."""
    if key == "v4_flash":
        attn = "swa" if layer < 2 else "csa" if layer % 2 == 0 else "hca"
    else:
        attn = "hca" if layer < 2 or layer % 2 == 1 else "csa"
    return attn, layer < 3


def _v4_rows(key: str, attn: str, hashed: bool, mtp: bool = False) -> list:
    rows = V4_ALL + V4_EXPERTS + (V4_HASH if hashed else V4_LEARNED)
    rows += {"swa": [], "csa": V4_CSA, "hca": V4_HCA}[attn] + (V4_MTP_EXTRA if mtp else [])
    col = 1 if key == "v4_flash" else 3
    return [(r[0], r[col], r[col + 1]) for r in rows]


def _expected_v4(key: str, rows: list, prefix: str) -> tuple[dict, dict]:
    """{name: logical shape}, {name: scale shape} for one scope of the reference table."""
    E = _cfg(key).moe.n_routed_experts
    shapes, scales = {}, {}
    for suffix, shape, scale in rows:
        for j in range(E) if "{j}" in suffix else [None]:
            name = prefix + suffix.format(j=j)
            fp4 = "{j}" in suffix
            shapes[name] = (*shape[:-1], 2 * shape[-1]) if fp4 else shape
            if scale is not None:
                scales[name] = scale
    return shapes, scales


def _ours_scales(key: str, names: dict) -> dict:
    """The scale each of our official weights gets: FP8 (family.fp8_names) -> the 128x128 block grid;
    routed experts (FP4) -> [out, in/32]. Read from the shape, as the exporter does."""
    fam = CONFIGS[key][1].FAMILY
    out = {}
    for n, s in names.items():
        if fam is v4.FAMILY and V4_FP4.search(n):
            out[n] = (s[0], s[1] // 32)
        elif re.search(fam.fp8_names, n):
            out[n] = tuple(-(-d // 128) for d in s)
    return out


def _v4_reference(key: str) -> tuple[dict, dict]:
    """{official name: logical shape}, {official name: scale shape} of the whole checkpoint per §1.13:
    every layer with its kind from §1.1's schedule, the MTP layer and the globals."""
    want, want_scales = {}, {}
    for layer in range(_cfg(key).n_layers):
        s, sc = _expected_v4(
            key, _v4_rows(key, *_v4_reference_kind(key, layer)), f"layers.{layer}."
        )
        want.update(s), want_scales.update(sc)
    s, sc = _expected_v4(key, _v4_rows(key, "swa", hashed=False, mtp=True), "mtp.0.")
    want.update(s), want_scales.update(sc)
    col = 1 if key == "v4_flash" else 3
    s, sc = _expected_v4(key, [(r[0], r[col], r[col + 1]) for r in V4_GLOBAL], "")
    want.update(s), want_scales.update(sc)
    return want, want_scales


@pytest.mark.parametrize("key", V4_KEYS)
def test_v4_official_names_and_shapes_vs_reference(key):
    """Every layer (each kind: SWA, CSA, HCA, hash / learned routing), the MTP layer and the globals.
    Note the latent KV norm: released `layers.{i}.attn.kv_norm.weight` (the official model.py's
    `Attention.kv_norm`; header dumps of the release), while transformers' save_pretrained writes
    `model.layers.{i}.attn.norm.weight` (reverse of its `\\.norm\\.` -> `.kv_norm.` rename), so the
    "official" and "hf" layouts differ there beyond the `model.` prefix."""
    ours = _named(key, "official")
    want = _v4_reference(key)[0]
    assert ours == want, _diff(
        ours, want, f"{key} official names vs reference §1.13", "ours", "reference"
    )


@pytest.mark.parametrize("key", V4_KEYS)
def test_v4_quantised_weights_vs_reference(key):
    """FP8 (family.fp8_names) + FP4 (routed experts) = exactly the weights §1.13 stores with a scale,
    with the same scale grids (the KV norm is not quantised, so its spelling does not matter here)."""
    ours = _ours_scales(key, _named(key, "official"))
    want = _v4_reference(key)[1]
    assert ours == want, _diff(ours, want, f"{key} scales", "ours", "reference")


def _released_count(key: str) -> int:
    """Our official tensors + one scale per FP8 / FP4 weight (+ V3's two MTP copies we skip)."""
    ours = _named(key, "official")
    n = len(ours) + len(_ours_scales(key, ours))
    if CONFIGS[key][1] is v3:  # + model.layers.61.{embed_tokens, shared_head.head}
        n += 2 * _cfg(key).num_nextn_predict_layers
    return n


# checkpoint_formats.md §2.1 (V3: header dump of deepseek-ai/DeepSeek-V3), §3.2 (V4-Flash: third-party
# header dumps of the release; V4-Pro: "≈ 145,116" [derived]); V3.2 [derived]: V3 + 7 indexer tensors
# per layer (wq_b and wk with their scales, k_norm weight and bias, weights_proj) in 62 layers.
TOTALS = [
    ("v3_671b", 91_991),
    ("v32_671b", 91_991 + 62 * 7),
    ("v4_flash", 69_187),
    pytest.param("v4_pro", 145_116, marks=SLOW),
]


@pytest.mark.parametrize("key, total", TOTALS)
def test_released_tensor_totals(key, total):
    assert _released_count(key) == total


def test_v3_inventory_and_shapes_vs_reference():
    """checkpoint_formats.md §2.1-2.2 and §2.4: per-layer counts (scales included) and HF shapes."""
    ours = _named("v3_671b", "hf")
    scales = _ours_scales("v3_671b", _named("v3_671b", "official"))
    official = {e.name("hf"): e.name("official") for e in _ours("v3_671b")[1]}
    per = {}
    for n in ours:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        k = int(m.group(1)) if m else "global"
        per[k] = per.get(k, 0) + 1 + (official[n] in scales)
    per[61] += 2  # the skipped copies model.layers.61.{embed_tokens, shared_head.head}
    assert {per[i] for i in range(3)} == {20} and {per[i] for i in range(3, 61)} == {1558}
    assert per[61] == 1564 and per["global"] == 3
    table_22 = {  # HF name under model.layers.{i}.: (weight, scale)
        "self_attn.q_a_proj.weight": ((1536, 7168), (12, 56)),
        "self_attn.q_b_proj.weight": ((24576, 1536), (192, 12)),
        "self_attn.kv_a_proj_with_mqa.weight": ((576, 7168), (5, 56)),
        "self_attn.kv_b_proj.weight": ((32768, 512), (256, 4)),
        "self_attn.o_proj.weight": ((7168, 16384), (56, 128)),
        "mlp.experts.7.gate_proj.weight": ((2048, 7168), (16, 56)),
        "mlp.experts.255.up_proj.weight": ((2048, 7168), (16, 56)),
        "mlp.experts.0.down_proj.weight": ((7168, 2048), (56, 16)),
        "mlp.shared_experts.gate_proj.weight": ((2048, 7168), (16, 56)),
        "mlp.shared_experts.down_proj.weight": ((7168, 2048), (56, 16)),
        "mlp.gate.weight": ((256, 7168), None),
        "mlp.gate.e_score_correction_bias": ((256,), None),
    }
    for layer in (3, 30, 60, 61):
        for suffix, (shape, scale) in table_22.items():
            name = f"model.layers.{layer}.{suffix}"
            assert ours[name] == shape, name
            assert scales.get(official[name]) == scale, name
    for suffix, shape in {
        "mlp.gate_proj.weight": (18432, 7168),
        "mlp.up_proj.weight": (18432, 7168),
        "mlp.down_proj.weight": (7168, 18432),
    }.items():
        assert ours[f"model.layers.0.{suffix}"] == shape
        assert scales[official[f"model.layers.0.{suffix}"]] == tuple(-(-d // 128) for d in shape)
    for suffix, shape in {
        "eh_proj.weight": (7168, 14336),
        "enorm.weight": (7168,),
        "hnorm.weight": (7168,),
        "shared_head.norm.weight": (7168,),
    }.items():
        assert (
            ours[f"model.layers.61.{suffix}"] == shape
            and official[f"model.layers.61.{suffix}"] not in scales
        )
    assert ours["model.embed_tokens.weight"] == ours["lm_head.weight"] == (129280, 7168)
    # V3.2 indexer (deepseek_v4_architecture.md §2): wq_b, wk FP8; k_norm LayerNorm; weights_proj bf16
    v32, s32 = _named("v32_671b", "hf"), _ours_scales("v32_671b", _named("v32_671b", "official"))
    for layer in (0, 3, 61):
        p = f"model.layers.{layer}.self_attn.indexer."
        assert [
            v32[p + s]
            for s in (
                "wq_b.weight",
                "wk.weight",
                "k_norm.weight",
                "k_norm.bias",
                "weights_proj.weight",
            )
        ] == [(8192, 1536), (128, 7168), (128,), (128,), (64, 7168)]
        o = (
            p.replace("model.layers.61.", "mtp.0.")
            .replace("model.", "")
            .replace("self_attn.", "attn.")
        )
        assert [o + s in s32 for s in ("wq_b.weight", "wk.weight", "weights_proj.weight")] == [
            True,
            True,
            False,
        ]


# ----------------------------------------------------------------------------------------------
# 4. Bijection: names unique per layout, every slice of our variables filled exactly once
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_bijection(key):
    fam = CONFIGS[key][1].FAMILY
    _, ents, abstract, shapes = _ours(key)
    for layout in fam.layouts:  # unique names per layout
        names = [e.name(layout) for e in ents]
        assert len(set(names)) == len(names), f"{key} {layout}: duplicate names"
    for a, b in itertools.combinations(fam.layouts, 2):  # layouts pair entry by entry
        pairs = {(e.name(a), e.name(b)) for e in ents}
        assert len({p[0] for p in pairs}) == len({p[1] for p in pairs}) == len(pairs) == len(ents)
    leaves = dict(table.iter_leaves(abstract))
    pieces = table.leaf_pieces(ents)
    assert set(pieces) == set(leaves), (
        sorted(set(leaves) - set(pieces))[:5],
        sorted(set(pieces) - set(leaves))[:5],
    )
    # each leaf's leading (repeat[, expert]) indices: each exactly once
    for leaf, parts in pieces.items():
        depth = {len(idx) for idx, _, _ in parts}
        assert len(depth) == 1, (leaf, depth)
        lead = leaves[leaf].shape[: depth.pop()]
        idx = [i for i, _, _ in parts]
        assert len(idx) == len(set(idx)) and set(idx) == set(
            itertools.product(*map(range, lead))
        ), leaf
    # each tensor holds exactly its slices' elements
    for e, s in zip(ents, shapes):
        assert math.prod(s) == sum(
            math.prod(leaves[leaf].shape[len(e.index) :]) for leaf in e.leaves
        ), e.names
    total = sum(int(np.prod(v.shape)) for v in leaves.values())
    assert sum(math.prod(s) for s in shapes) == total
