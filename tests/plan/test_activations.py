"""deepseek_jax/plan/activations.py: the saved-residual measurement against an independent count, the
working-set and fit arithmetic, the report rows and the plan CLI's --hbm-gib / --headroom flags."""

import math

import jax
import pytest

from deepseek_jax import cli
from deepseek_jax.config import load_config
from deepseek_jax.plan import activations as acts
from deepseek_jax.plan import format_report, plan
from deepseek_jax.program import build_program
from deepseek_jax.sharding import abstract_mesh, rules
from tests.utils import ROOT

# the tiny V3 as one dense block + MoE blocks in one scanned segment, no MTP: under remat "full" each
# scanned block keeps exactly its input [B, T, D] (the scan carry), nothing else per layer
TINY = ["model.n_dense_layers=1", "model.num_nextn_predict_layers=0", "model.vocab_size=512", "data.seq_len=16",
        "data.global_batch_size=2", "model.remat=full"]


def tiny(*overrides, mesh="single"):
    cfg = load_config([ROOT / "configs/model/tiny.yaml", ROOT / f"configs/mesh/{mesh}.yaml"], [*TINY, *overrides])
    return cfg, build_program(cfg, abstract_mesh(cfg.mesh, 1 if mesh == "single" else 8), rules(cfg.mesh))


@pytest.mark.slow  # five traces of the tiny model's grad (~5-20 s on 2 shared cores)
def test_saved_residuals_of_full_remat_are_the_block_inputs():
    """Two more scanned blocks under remat=full save exactly two more block inputs, B·T·D in the compute
    dtype (an independent count: the carry's shape), at batch 1 and 2; and under remat=none they save
    more than that (the blocks' inner activations)."""
    got = {}
    for n_layers in (3, 5):
        cfg, p = tiny(f"model.n_layers={n_layers}")
        a = p.abstract_state
        got[n_layers] = [acts.residual_bytes(cfg, a.params, a.router, B)[0] for B in (1, 2)]
    m = cfg.model
    c = jax.numpy.dtype(m.dtype).itemsize
    for i, B in enumerate((1, 2)):
        assert got[5][i] - got[3][i] == 2 * B * cfg.data.seq_len * m.dim * c, (got, B)
    cfg, p = tiny("model.n_layers=5", "model.remat=none")
    a = p.abstract_state
    assert acts.residual_bytes(cfg, a.params, a.router, 1)[0] > got[5][0] + 4 * cfg.data.seq_len * m.dim * c


def test_working_set_and_fit_arithmetic():
    """The ring dispatch, loss chunk and DSA query block rows follow the module formulas; fit keeps the
    headroom and rejects bad sizes."""
    cfg = load_config([ROOT / "configs/model/tiny_v32.yaml"], ["data.seq_len=64", "data.global_batch_size=4",
                                                             "train.loss_chunk_tokens=16"])
    m = cfg.model
    w = acts.working_set(cfg, token_shards=8, B_local=2, cp=2, ep=4)
    M, c, f = 4 * 64 / 8, jax.numpy.dtype(m.dtype).itemsize, 4
    X = M * m.moe.n_activated_experts
    assert w["moe_dispatch"] == M * 4 * m.dim * (c + f) + X * m.moe.moe_inter_dim * c * 3
    assert w["loss_chunk"] == 16 * m.vocab_size * f * 3 + m.dim * m.vocab_size * (f + c)
    # by hand (tiny V3.2, f32): b = 2 sequences x 32 queries, U = top-64 of T = 64 keys, k_block 1024 clamped
    # to T: b·U·(C+R)·4 + b·N·U·4·2 + b·(U+64)·8 + b·P·64·4 = 786,432 + 131,072 + 65,536 + 65,536
    assert w["query_block"] == 1_048_576
    dense = load_config([ROOT / "configs/model/tiny.yaml"], ["data.seq_len=64", "data.global_batch_size=4",
                                                           "model.mla.k_block=0"])  # 0 = all T keys at once
    assert acts.working_set(dense, token_shards=8, B_local=2, cp=2, ep=4)["query_block"] == 64 * 4 * 64 * 4 * 2
    mem = {"saved": 10.0, "remat_block": 1.0, "attention_keys": 2.0, "query_block": 3.0, "moe_dispatch": 4.0,
           "loss_chunk": 7.0}
    assert acts.peak(mem) == 18.0
    f1 = acts.fit(2**30, 2**30, hbm_gib=2.5, headroom=0.2)
    assert f1["fits"] and f1["usable"] == 2.0 * 2**30 and f1["need"] == 2**31
    assert not acts.fit(2**30, 2**30, hbm_gib=2.2, headroom=0.2)["fits"]
    with pytest.raises(ValueError, match="--hbm-gib"):
        acts.fit(1, 1, hbm_gib=0, headroom=0.1)


@pytest.mark.slow  # lowers the tiny model on an abstract 8-device mesh and traces its residuals 3 times (~10 s)
def test_plan_reports_activations_and_fit():
    """plan() on fsdp_cp_ep: the saved residuals equal fixed + per sequence · B / token shards; the report
    prints the activation rows and the verdict, which flips with the HBM size."""
    cfg, _ = tiny("model.n_layers=3", "data.global_batch_size=4", "data.seq_len=32", mesh="fsdp_cp_ep")
    r = plan(cfg, 8, compile=False, hbm_gib=64)
    a = r.activations
    assert math.isclose(a["saved"], a["residual_fixed"] + a["residual_per_sequence"] * 4 / 8)
    assert a["remat_block"] > 0 and a["peak"] > a["saved"]
    text = format_report(r)
    for label in ("saved residuals", "remat block", "attention keys", "MoE dispatch", "loss chunk", "activation peak"):
        assert label in text, label
    assert "FITS in 64.00 GiB with 10% headroom" in text
    need = r.fit["need"] / 2**30
    assert not plan(cfg, 8, compile=False, hbm_gib=need * 0.95).fit["fits"]


@pytest.mark.parametrize("flags,says", [(["--hbm-gib", "0"], "--hbm-gib"),
                                        (["--hbm-gib", "80", "--headroom", "1.5"], "--headroom must be in"),
                                        (["--headroom", "0.2"], "give --hbm-gib N too")])
def test_cli_rejects_bad_fit_flags(flags, says, capsys):
    assert cli.main(["plan", str(ROOT / "configs/model/tiny.yaml"), *flags]) == 2
    assert says in capsys.readouterr().err
