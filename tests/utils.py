"""Shared test helpers: tolerances (STYLE.md §6) and a closeness check that reports its errors."""

import numpy as np

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
    """The value at `path` in every main-model layer, in layer order, from a scanned variable or
    intermediates tree (segments `layers_a_b`, slots `block_k`, leading [repeats] axis); layers that
    lack the path are skipped. A sown intermediate is a 1-tuple: end the path with 0."""
    from deepseek_jax.models import layer_kinds, layer_segments

    found = {}
    for seg in layer_segments(layer_kinds(cfg)):
        for k in range(len(seg.kinds)):
            node = tree.get(seg.name, {}).get(f"block_{k}")
            for key in path:
                node = None if node is None or (isinstance(node, dict) and key not in node) else node[key]
            if node is not None:
                found.update({layer: node[r] for r, layer in enumerate(seg.layers(k))})
    return [found[layer] for layer in sorted(found)]
