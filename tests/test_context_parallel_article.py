"""The pod layout of the article model (configs/mesh/fsdp_cp_ep.yaml) at tiny scale, on 8 fake CPU devices.

fsdp 2 x context 2 x expert 2: the batch over fsdp, each sequence over context x expert (cp = 4), the
routed experts dispatched over `expert` (an axis that also splits the sequence), weights ZeRO-3 over
all three, Engram rows over all three. The tiny article model (MLA + DSA indexer in every block, mHC 4
streams, V4 MoE with a hash-routed first layer, Engram before layers 1 and 3, MTP) gives the
single-device loss terms, expert counts and gradients (tests/test_sharding.py's helpers and
tolerances) and identical indexer picks; then the tiny V3.2.
"""

import numpy as np
import pytest

from deepseek_jax.config import load_config
from deepseek_jax.sharding import activate, make_mesh, moe_axes, rules
from tests.utils import ROOT

pytestmark = pytest.mark.multidevice
MESH = ROOT / "configs/mesh/fsdp_cp_ep.yaml"
# 8 rows of 32 tokens (cp = 4: 8 per device, 4 after the dual-chunk swap's halves); index_topk 8 < 32 so
# the DSA selection is live; compressed_vocab_size = the tiny vocabulary (the batch hashes raw ids)
ARTICLE_SMALL = ["data.seq_len=32", "data.global_batch_size=8", "model.index.index_topk=8"]
V32_SMALL = ["model.n_layers=2", "model.vocab_size=512", "data.seq_len=32", "data.global_batch_size=8",
             "model.n_dense_layers=1", "model.index.index_topk=8"]
CASES = {"tiny_article": ARTICLE_SMALL, "tiny_v32": V32_SMALL}


def cfg_on(mesh_path, model: str):
    return load_config([ROOT / f"configs/model/{model}.yaml", mesh_path], CASES[model])


def test_layout_dispatches_experts_over_a_sequence_axis():
    """The rules put `expert` among the sequence axes: the dispatch's expert axes split the tokens (the
    all-or-none condition of layers/moe/dispatch.py), so tokens travel and expert weights do not."""
    cfg = cfg_on(MESH, "tiny_article")
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 2, "expert": 2, "tensor": 1}
    with activate(mesh, rules(cfg.mesh)):
        ax = moe_axes()
    assert ax.expert == ("expert",) and ax.tokens == (("fsdp",), ("context", "expert")), ax


@pytest.mark.slow  # a grad compile on 8 devices per model (~20-40 s), the single-device reference once each
@pytest.mark.parametrize("model", sorted(CASES))
def test_tiny_models_on_pod_layout(model):
    """Loss terms, expert counts and gradients on fsdp_cp_ep equal one device (rtol 1e-5, gradients to
    scale; mHC scales 1e-4 and Engram 1e-2 as in test_context_parallel.py, for the reasons given
    there); the indexer picks of every layer equal exactly."""
    from tests import test_context_parallel as tcp
    from tests import test_sharding as ts

    ref_v, batch, ref_out, ref_grads = ts.single_device(cfg_on(ROOT / "configs/mesh/single.yaml", model))
    cfg = cfg_on(MESH, model)
    _, out, grads, _ = ts.run_on_mesh(cfg, ref_v, batch)
    rtols = {"/engram/": 1e-2, "_hc/scale": 1e-4, "hc_head/scale": 1e-4}
    ts.compare(out, grads, ref_out, ref_grads, f"{model}/fsdp_cp_ep", rtols=rtols)
    want = tcp.sown_picks(cfg, ref_v, batch)
    mesh = make_mesh(cfg.mesh)
    with activate(mesh, rules(cfg.mesh)):
        got = tcp.sown_picks(cfg, ref_v, batch)
    assert want and len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"{model}/fsdp_cp_ep: indexer picks of layer entry {i}")
