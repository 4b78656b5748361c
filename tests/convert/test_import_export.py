"""`convert import` / `convert export` end to end on tiny checkpoints as users meet them.

Every variant (transformers' `save_pretrained` layout or DeepSeek's official names; MTP tensors absent
or present; float, FP8 block-scaled, or FP8 + FP4 experts) imports with one call and gives logits
within 1e-4 (fp32) of transformers on the same (dequantised) weights, with identical routed experts;
its export loads in transformers with no missing or unexpected keys and the same logits; an FP8
export imports back to the FP8-rounded values bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_model_config  # noqa: E402
from deepseek_jax.convert import table  # noqa: E402
from deepseek_jax.convert.exporter import export_checkpoint  # noqa: E402
from deepseek_jax.convert.formats import dequant  # noqa: E402
from deepseek_jax.convert.importer import abstract_variables, import_checkpoint  # noqa: E402
from deepseek_jax.convert.orbax_writer import restore_tree  # noqa: E402
from deepseek_jax.convert.source import open_source  # noqa: E402
from deepseek_jax.models import build_model  # noqa: E402
from tests.convert.checkpoints import hf_model, read_all, torch, transformers, variant
from tests.utils import per_layer

pytestmark = pytest.mark.parity
B, T = 2, 40


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """save_pretrained directories of one random tiny model per family."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in ("v3", "v32", "v4"):
        hf_model(fam).save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def hf_logits_and_experts(directory, tokens):
    """transformers' own load of `directory`: logits and each MoE layer's chosen experts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    experts, hooks = [], []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            hooks.append(gate.register_forward_hook(lambda m, a, out: experts.append(out[2].numpy())))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, experts


def our_outputs(out_dir, tokens):
    cfg = load_model_config([out_dir / "config.yaml"], ["model.dtype=float32", "model.moe.impl=dense"])
    abstract = abstract_variables(cfg)
    variables = restore_tree(out_dir / "params", abstract)
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(lambda v, t: build_model(cfg).apply(v, t, mutable=["intermediates"]))(
            variables, jnp.asarray(tokens)
        )
    experts = per_layer(inter["intermediates"], cfg, "ffn", "experts_MA", 0)
    return cfg, variables, np.asarray(out.logits), [np.asarray(e) for e in experts]


def _tokens(vocab):
    return np.random.default_rng(3).integers(0, vocab, (B, T))


CASES = [  # (family, layout, quant, MTP tensors present); the inner loop keeps one per family
    ("v3", "hf", "none", False), ("v3", "official", "fp8", True), ("v3", "hf", "fp8", True),
    ("v32", "hf", "fp8", False), ("v32", "official", "none", True),
    ("v4", "hf", "none", False), ("v4", "official", "fp8_fp4", True), ("v4", "hf", "fp8_fp4", False),
]  # fmt: skip
INNER = {("v3", "official", "fp8", True), ("v32", "hf", "fp8", False), ("v4", "official", "fp8_fp4", True)}


def _slow_unless(cases, keep):
    """`cases` as parametrize values, those not in `keep` marked slow."""
    values = [c if isinstance(c, tuple) else (c,) for c in cases]
    return [c if c in keep else pytest.param(*v, marks=pytest.mark.slow) for c, v in zip(cases, values)]


@pytest.mark.parametrize(
    "family,layout,quant,mtp", _slow_unless(CASES, INNER), ids=["-".join(map(str, c)) for c in CASES]
)
def test_import_matches_transformers(bases, tmp_path, family, layout, quant, mtp):
    src, ref = variant(tmp_path, family, layout, quant, mtp, bases[family])
    notes = []
    out = import_checkpoint(src, tmp_path / "out", log=notes.append)
    assert any("no MTP" in n for n in notes) != mtp  # said once when absent, not when present
    cfg, variables, logits, experts = our_outputs(out, _tokens(open_source(src).cfg.vocab_size))
    assert cfg.num_nextn_predict_layers == (1 if mtp else 0)
    want, hf_experts = hf_logits_and_experts(ref, _tokens(cfg.vocab_size))
    err = np.abs(logits - want).max()
    print(f"\n{family} {layout} {quant} mtp={mtp}: max|dlogit| {err:.2e}")
    assert err <= 1e-4
    assert len(experts) == len(hf_experts) > 0
    for layer, (ours, theirs) in enumerate(zip(experts, hf_experts)):
        np.testing.assert_array_equal(np.sort(ours, -1), np.sort(theirs.reshape(B * T, -1), -1), f"layer {layer}")
    # the whole tree, MTP included, equals the in-memory walk over the dequantised tensors
    s = open_source(src)
    state = {n: s.load(n) for n in s.refs}
    want_vars = table.to_variables(state, s.family, s.cfg, s.layout)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables, want_vars)


@pytest.mark.parametrize("family", _slow_unless(["v3", "v32"], ()) + ["v4"])
def test_export_loads_in_transformers(bases, tmp_path, family):
    out = import_checkpoint(bases[family], tmp_path / "ours", log=lambda _: None)
    exported = export_checkpoint(out, tmp_path / "hf", max_shard_bytes=60_000, log=lambda _: None)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    tokens = _tokens(model.config.vocab_size)
    want, _ = hf_logits_and_experts(bases[family], tokens)
    got, _ = hf_logits_and_experts(exported, tokens)
    assert np.abs(got - want).max() <= 1e-4
    assert sorted(read_all(exported)) == sorted(read_all(bases[family]))  # the same names on disk


@pytest.mark.parametrize("family,layout", _slow_unless([("v3", "hf"), ("v32", "official")], ()) + [("v4", "official")])
def test_fp8_export_imports_back_bit_for_bit(bases, tmp_path, family, layout):
    out = import_checkpoint(bases[family], tmp_path / "ours", log=lambda _: None)
    fp8 = export_checkpoint(out, tmp_path / "fp8", layout=layout, quant="fp8", log=lambda _: None)
    stored = read_all(fp8)
    assert any(a.dtype.name == "float8_e4m3fn" for a in stored.values())
    scales = [a for n, a in stored.items() if n.endswith((".scale", ".weight_scale_inv"))]
    if family == "v32":  # as released: F32 scales that are powers of two (scale_fmt ue8m0)
        assert scales and all(a.dtype == np.float32 and (np.frexp(a)[0] == 0.5).all() for a in scales)
    back = import_checkpoint(fp8, tmp_path / "back", log=lambda _: None)
    again = export_checkpoint(back, tmp_path / "fp8_again", layout=layout, quant="fp8", log=lambda _: None)
    again_stored = read_all(again)
    assert sorted(again_stored) == sorted(stored)
    for name, a in stored.items():  # export(import(export(x))) == export(x), codes and scales
        np.testing.assert_array_equal(again_stored[name].view(np.uint8), a.view(np.uint8), name)
    # and the imported values are exactly the dequantised FP8 tensors
    s = open_source(fp8)
    for name, ref in list(s.refs.items())[:40]:
        if ref.scale is not None:
            want = dequant(name, stored[ref.tensor], stored[ref.scale])
            np.testing.assert_array_equal(s.load(name), want)
