"""Checkpoints that do not fit the model are refused with the tensors named (not Orbax's first key)."""

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.checkpoint import Checkpointer, CheckpointError


def test_restore_into_another_parameter_tree_names_the_differences(tmp_path):
    ckpt = Checkpointer(tmp_path, use_async=False)
    state = {"params": {"moe_layers": {"w": jnp.ones((2, 3))}, "e": jnp.zeros(4)}, "step": jnp.int32(7)}
    ckpt.save(7, state, {"position": 1}, {"model": {}})
    ckpt.wait()
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    renamed = {"params": {"layers_1_3": {"block_0": {"w": spec(2, 3)}}, "e": spec(4)},
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(CheckpointError, match=r"missing \['params/layers_1_3/block_0/w'\].*unexpected "
                                              r"\['params/moe_layers/w'\]"):
        ckpt.restore(7, renamed)
    same = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored, data, _ = ckpt.restore(7, same)
    assert int(restored["step"]) == 7 and data == {"position": 1}
    ckpt.close()
