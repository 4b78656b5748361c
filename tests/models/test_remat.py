"""`model.remat`: every jax.checkpoint policy of the scanned blocks gives the same loss and
gradients as no remat (it changes what the backward recomputes, never the math); the saved-name
policy really saves the attention outputs; offload is refused on CPU before compiling."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, load_model_config
from deepseek_jax.models import build_model, check_remat_backend
from deepseek_jax.models.common import ATTENTION_OUT, remat_policy
from tests.utils import ROOT, TOL, assert_close

# the tiny V3.2 at two layers (a dense and a MoE DSA block) and MTP: every remat-wrapped part is live
SMALL = ["model.vocab_size=256", "model.n_layers=2", "model.index.index_topk=8"]


def loss_and_grads(cfg, variables, tokens):
    model = build_model(cfg)

    def loss(params):
        out = model.apply({**variables, "params": params}, tokens, index_loss=True)
        lp = jax.nn.log_softmax(out.logits[:, :-1])
        ce = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
        return ce + out.routing.balance_loss.sum() + out.index_loss.sum() + out.mtp.logits.mean()

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.fixture(scope="module")
def reference():
    cfg = load_model_config([ROOT / "configs/model/tiny_v32.yaml"], SMALL)
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    variables = nn.unbox(jax.jit(build_model(cfg).init)(jax.random.key(0), tokens))
    return cfg, variables, tokens, loss_and_grads(cfg, variables, tokens)


# the inner loop keeps save_attention (the named-residual policy); full and save_dots are slow
# (~2 s each warm, ~6 s cold)
@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("save_dots", marks=pytest.mark.slow), "save_attention"])
def test_remat_policies_keep_the_math(reference, policy):
    cfg, variables, tokens, (want_loss, want_grads) = reference
    loss, grads = loss_and_grads(dataclasses.replace(cfg, remat=policy), variables, tokens)
    tol = TOL["resharded_f32"]  # the same f32 math, recomputed (XLA may fuse it differently)
    assert_close(loss, want_loss, **tol, what=f"{policy}: loss")
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        assert_close(g, w, rtol=tol["rtol"], atol=1e-5 * float(np.abs(w).max() or 1), what=f"{policy}: {path}")


def test_save_attention_policy_saves_the_named_outputs(capsys):
    wrap, policy = remat_policy("save_attention")
    assert wrap
    f = jax.checkpoint(lambda x: jnp.sin(jax.ad_checkpoint.checkpoint_name(jnp.sin(x), ATTENTION_OUT)), policy=policy)
    jax.ad_checkpoint.print_saved_residuals(f, jnp.ones(3))
    saved = capsys.readouterr().out
    assert f"named '{ATTENTION_OUT}'" in saved, saved


def test_offload_needs_an_accelerator():
    cfg = load_model_config([ROOT / "configs/model/tiny.yaml"], ["model.remat=offload"])
    with pytest.raises(ConfigError, match="remat=offload"):
        check_remat_backend(cfg, "cpu")
    check_remat_backend(cfg, "gpu")
