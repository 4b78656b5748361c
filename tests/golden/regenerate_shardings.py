"""Writes tests/golden/shardings/<model>__<mesh>.txt: the partition spec of every parameter of the
tiny V3, V3.2, V4 and V4.1 models and the tiny multimodal model (its media front-ends under `media/`:
ViT, aligner, audio, delimiters) and of their `router` collection (selection biases, V4's tid2eid
tables) under each configs/mesh/*.yaml on 8 devices (an abstract mesh: no device is needed).

    python tests/golden/regenerate_shardings.py      # then review `git diff tests/golden`

tests/test_sharding.py compares the same rendering with the checked-in files, so a change to a
rule, a parameter's logical axes or a mesh file shows up as a reviewed diff.
"""

import functools
import sys
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "shardings"
MODELS = {name: ROOT / "configs" / "model" / f"{name}.yaml"
          for name in ("tiny", "tiny_v32", "tiny_v4", "tiny_composed", "tiny_v41", "tiny_multimodal")}
N_DEVICES = 8


@functools.cache
def boxed_variables(model_cfg):
    """The abstract boxed variables (shapes + logical axes): mesh-independent, so traced once."""
    from deepseek_jax.models import build_model, init_inputs

    tokens, kw = init_inputs(model_cfg)
    return jax.eval_shape(partial(build_model(model_cfg).init, mutable=["params", "router"], **kw),
                          jax.random.key(0), tokens)


def render(model_name: str, mesh_path: Path) -> str:
    from deepseek_jax.config import load_config
    from deepseek_jax.sharding import abstract_mesh, rules

    cfg = load_config([MODELS[model_name], mesh_path])
    mesh = abstract_mesh(cfg.mesh, N_DEVICES)
    boxed = boxed_variables(cfg.model)
    lines = [f"# {model_name} under {mesh_path.name} on {N_DEVICES} devices, mesh {dict(mesh.shape)}",
             "# path: shape -> PartitionSpec (regenerate: python tests/golden/regenerate_shardings.py)"]
    for collection in ("params", "router"):
        specs = nn.get_partition_spec(boxed[collection])
        mesh_specs = nn.logical_to_mesh(specs, rules(cfg.mesh))
        is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
        flat_specs = jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=is_spec)[0]
        shapes = jax.tree.leaves(nn.unbox(boxed[collection]))
        for (path, spec), shape in zip(flat_specs, shapes):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            lines.append(f"{collection}/{name}: {list(shape.shape)} -> {tuple(spec)}")
    return "\n".join(lines) + "\n"


def golden_path(model_name: str, mesh_path: Path) -> Path:
    return GOLDEN / f"{model_name}__{mesh_path.stem}.txt"


def main() -> int:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for model_name in MODELS:
        for mesh_path in sorted((ROOT / "configs" / "mesh").glob("*.yaml")):
            golden_path(model_name, mesh_path).write_text(render(model_name, mesh_path))
            print(golden_path(model_name, mesh_path).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
