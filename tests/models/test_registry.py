"""The registry (`deepseek_jax.models`): every variant's layer plan, its scan segments, where the
selection biases sit, which checkpoint family converts it, and the arguments a model refuses rather
than ignores."""

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.convert import article, v3, v4
from deepseek_jax.models import LayerKind, build_model, converter, layer_kinds, layer_segments, router_bias_rows
from tests.utils import ROOT


def model_cfg(name: str, *overrides: str):
    return load_model_config([ROOT / f"configs/model/{name}.yaml"], list(overrides))


def test_layer_plans_of_the_released_configs():
    v3 = model_cfg("deepseek_v3_671b")
    assert [s.name for s in layer_segments(layer_kinds(v3))] == ["layers_0_2", "layers_3_60"]
    assert layer_kinds(v3)[0] == LayerKind("mla", 0, "dense") and layer_kinds(v3)[3] == LayerKind("mla", 0, "moe")
    v32 = model_cfg("deepseek_v32_671b")
    assert {k.attention for k in layer_kinds(v32)} == {"dsa"}
    flash = model_cfg("deepseek_v4_flash")
    assert [s.name for s in layer_segments(layer_kinds(flash))] == ["layers_0_1", "layers_2", "layers_3_42"]
    assert [k.ffn for k in layer_kinds(flash)[:4]] == ["hash", "hash", "hash", "moe"]


def test_bias_rows_index_the_moe_layers_in_order():
    """V3: one stacked bias over the MoE layers (rows 0..57 of routing.counts), then MTP."""
    rows = router_bias_rows(model_cfg("deepseek_v3_671b"))
    assert rows[0].path == ("layers_3_60", "block_0", "ffn", "bias") and rows[0].source == "main"
    assert rows[0].rows == tuple(range(58))
    assert [(r.path[0], r.source, r.rows) for r in rows[1:]] == [("mtp_0", "mtp", 0)]


def test_converter_follows_the_composition():
    assert converter(model_cfg("tiny")) is v3.FAMILY and converter(model_cfg("tiny_v32")) is v3.FAMILY
    assert converter(model_cfg("tiny_v4")) is v4.FAMILY
    # MLA / DSA blocks on mHC streams: no release has them; the article layout (convert/article.py) does
    assert converter(model_cfg("tiny_composed")) is article.FAMILY
    assert converter(model_cfg("tiny_article")) is article.FAMILY


def test_arguments_a_model_cannot_honour_are_refused():
    v4 = model_cfg("tiny_v4", "model.vocab_size=64")
    tokens = jnp.zeros((1, 8), jnp.int32)
    model = build_model(v4)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="row's own positions"):
        jax.eval_shape(lambda v: model.apply(v, tokens, jnp.zeros((1, 8), jnp.int32)), variables)
    with pytest.raises(ValueError, match="row's own positions"):
        jax.eval_shape(lambda v: model.apply(v, tokens, cache_start_B=jnp.zeros((1,), jnp.int32)), variables)
    jax.eval_shape(lambda v: model.apply(v, tokens, index_loss=True), variables)  # V4 CSA layers: a KL each
    with pytest.raises(ValueError, match="index_loss=True needs DSA blocks"):  # V3: no indexer at all
        build_model(model_cfg("tiny")).check_call(None, None, True, None, (1, 8))
