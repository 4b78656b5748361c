"""DeepSeek-V4.1 (text model + Engram) at fp32 parity with transformers' `deepseek_v41`, from a fixture.

transformers has `deepseek_v41` on its main branch only, so the reference ran once, in a separate
environment, from the text-only revision of its model files (commit 0a2080b4) over the released
transformers 5.25.0 wheel: `tests/golden/v41/generate_fixture.py` (which records the commit, the
environment and the seeds in meta.json; NOTES.md lists the semantics it read). CI reads only the fixture:
the HF model's weights (in-memory names), its config.json and tokenizer, and its outputs on 2 sequences
of 41 tokens: a tiny random model with every V4.1 path live (sliding-window layers, a ratio-2 source and
reuse layer, a second ratio-2 source, the ratio-1 candidate source with reuse and reindex layers, Engram
on layers 1 and 4, single-pass mHC, the FP8 / FP4 fake-quant of the KV and indexer, the clamped SwiGLU).

Two references: the HF model as it is (fake-quant on) and the same model with its two fake-quant
functions patched to identity (`noqat.*`), against our model with `shared_kv.qat` on and off. The
second checks every float path without the discontinuous roundings; the first checks the roundings.

Which reference output: that revision's no-cache path accumulates the entries of every kv source into
one list (a bug: each source should replace them, reference notes §1.2; its cache path does), so the
fixture's `logits_use_cache` (one 41-token prefill through its cache path) is the target here. Sequence
1 holds a pad token (attention_mask 0) at position 20, which that revision masks as a key, hashes as
DEAD, but still pools and updates with Engram; our padding rules follow the later HF-VL revision (a pad
is gated off in Engram), so sequence 1 is compared before its pad only. The Engram row ids of both
sequences (pad included, as DEAD) are compared exactly with `engram_hash.hash_rows`.

Required: max |Δlogit| ≤ 1e-4, KL ≤ 1e-6, routed experts, indexer picks, the candidate pool and the
Engram ids identical.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from deepseek_jax.convert import table, v41
from deepseek_jax.engram_hash import compressed_vocab, engram_layout, hash_rows
from deepseek_jax.models import build_model
from tests.utils import ROOT, by_layer, kl

pytestmark = pytest.mark.parity
FIXTURE = ROOT / "tests" / "golden" / "v41"
PAD_AT = 20  # sequence 1's pad token
# The fake-quant is discontinuous: a value a few ulps from an FP8 / FP4 rounding midpoint can round either
# way, and one flip moves later logits by ~1e-2. This fixture has such a value (a window-KV entry of
# sequence 1 at position 5 lies 6.6e-7 (relative) from an e4m3 midpoint), which XLA:CPU's default
# optimisation level rounds as torch does and level 0 does not. The test compiles at the default level.
DEFAULT_XLA = {"xla_backend_optimization_level": 3}


@pytest.fixture(scope="module", params=["use_cache", "noqat"])
def setup(request):
    """(cfg, reference outputs under our key names, token map, rows, our output, our intermediates) for
    the QAT reference ("use_cache", compiled at XLA's default level) or the fake-quant-free one
    ("noqat": the same HF model with its two fake-quant functions patched to identity)."""
    raw = load_file(FIXTURE / "reference.safetensors")
    prefix = request.param + "."
    ref = {**raw, **{k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}}
    ref["logits"] = raw["logits_use_cache"] if request.param == "use_cache" else raw["noqat.logits"]
    hf_config = json.loads((FIXTURE / "config.json").read_text())
    # transformers ignores DSpark (`mtp.*`): the fixture has no stages, so neither does this model
    cfg = v41.config_from_json(hf_config, dtype="float32", max_seq_len=128, num_nextn_predict_layers=0)
    if request.param == "noqat":
        cfg = dataclasses.replace(cfg, shared_kv=dataclasses.replace(cfg.shared_kv, qat=False))
    weights = load_file(FIXTURE / "weights.safetensors")
    variables = table.to_variables(weights, v41.FAMILY, cfg, "hf_text")
    tokens = ref["input_ids"].astype(np.int32)
    cmap = compressed_vocab(Tokenizer.from_file(str(FIXTURE / "tokenizer.json")))
    rows = hash_rows(engram_layout(cfg.engram), cmap, tokens, dead_BT=ref["attention_mask"] == 0)
    model = build_model(cfg)
    forward = jax.jit(lambda v, t, r: model.apply(v, t, engram_rows=r, mtp=False, mutable=["intermediates"]))
    # XLA's default backend optimisation (tests/conftest.py turns it off to compile faster): see DEFAULT_XLA
    options = DEFAULT_XLA if request.param == "use_cache" else {}
    out, state = forward.lower(variables, tokens, rows).compile(options)(variables, tokens, rows)
    return cfg, ref, cmap, rows, out, state["intermediates"]


def _rows(x, b):  # the positions compared in row b
    return x[b] if b == 0 else x[b, :PAD_AT]


def test_engram_ids_and_token_map_equal_hf(setup):
    _, ref, cmap, rows, _, _ = setup
    np.testing.assert_array_equal(cmap, ref["engram.token_map"])
    np.testing.assert_array_equal(rows, ref["engram.hash_ids"])


def test_logits_match_hf(setup):
    cfg, ref, _, _, out, _ = setup
    want, got = ref["logits"], np.asarray(out.logits)
    worst_logit, worst_kl = 0.0, 0.0
    for b in range(2):
        g, w = _rows(got, b).astype(np.float64), _rows(want, b).astype(np.float64)
        worst_logit = max(worst_logit, float(np.abs(g - w).max()))
        worst_kl = max(worst_kl, float(np.max(kl(w, g))))  # float64
    which = "fake-quant" if cfg.shared_kv.qat else "no fake-quant"
    print(f"V4.1 vs transformers deepseek_v41 @0a2080b4 ({which}): max |Δlogit| {worst_logit:.2e}, "
          f"max KL {worst_kl:.2e} "
          f"(logit scale {np.abs(want).max():.1f})")
    assert worst_logit <= 1e-4 and worst_kl <= 1e-6


def test_routed_experts_equal_hf(setup):
    cfg, ref, _, _, _, inter = setup
    experts = by_layer(inter, cfg, "ffn", "experts_MA", 0)
    assert sorted(experts) == list(range(cfg.n_layers))
    for layer, e in experts.items():
        got = np.sort(e.reshape(2, -1, e.shape[-1]), axis=-1)
        want = ref[f"layers.{layer}.ffn.expert_ids"]
        for b in range(2):
            np.testing.assert_array_equal(_rows(got, b), _rows(want, b), err_msg=f"layer {layer} row {b}")


def test_indexer_picks_equal_hf(setup):
    cfg, ref, _, _, _, inter = setup
    picks = by_layer(inter, cfg, "attn", "index_topk_BTU", 0)
    assert sorted(picks) == list(cfg.shared_kv.index_source_layers)
    for layer, p in picks.items():
        got = np.sort(np.where(p < 0, np.iinfo(np.int32).max, p), axis=-1)
        hf = ref[f"layers.{layer}.indexer.topk_ids"]
        want = np.sort(np.where(hf < 0, np.iinfo(np.int32).max, hf), axis=-1)
        for b in range(2):
            np.testing.assert_array_equal(_rows(got, b), _rows(want, b), err_msg=f"layer {layer} row {b}")


def test_candidate_pool_equals_hf(setup):
    cfg, ref, _, _, _, inter = setup
    blocks = by_layer(inter, cfg, "attn", "candidate_blocks_BTK", 0)[cfg.shared_kv.candidate_source_layer]
    want = ref[f"layers.{cfg.shared_kv.candidate_source_layer}.indexer.candidate_mask"].astype(bool)
    size = cfg.shared_kv.candidate_block_size  # kept block ids [.., T, K] (−1 = none) -> entry mask
    entry_block = np.arange(want.shape[-1] + size) // size
    pool = (entry_block[None, None, :] == np.where(blocks < 0, -2, blocks)[..., None]).any(-2)
    for b in range(2):  # our entries run one past the last complete one (never visible): compare HF's 41
        np.testing.assert_array_equal(_rows(pool[:, :, : want.shape[-1]], b), _rows(want, b))


def test_fixture_provenance():
    meta = json.loads((FIXTURE / "meta.json").read_text())
    assert meta["source"]["model_files_commit"].startswith("0a2080b4"), meta["source"]
    assert jnp.asarray(0).dtype == jnp.int32  # the model sees int32 row ids (no x64 anywhere)
