"""Engram (layers/engram.py): both variants against a float64 numpy statement of their equations (the
v41 gate written with its weight product, the paper's with two RMSNorms and torch's Conv1d), the gate
mask as identity, the paper conv's causality, segment boundaries and chunked decoding, the table's
padding, and the sharded lookup on 8 fake CPU devices: value, gradient, and no gather of the table."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import MESH_AXES, EngramConfig, MeshConfig, load_config
from deepseek_jax.layers.engram import Engram, init_engram_cache, lookup, table_rows
from deepseek_jax.sharding import activate, make_mesh, rules
from tests.utils import CONFIGS, TOL, assert_close, assert_close_to_scale

pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py

B, T, I, D = 2, 14, 4, 16
N_ROWS, ROW_MULTIPLE = 150, 64  # the table stores 192 rows: 24 per shard on 8 devices
EPS = 1e-20  # V4.1's norm eps
SEGMENTS = np.array([[1] * 9 + [2] * 5, [1] * 11 + [0] * 3])  # two documents; trailing padding
MASK = SEGMENTS > 0


def make_cfg(variant: str) -> EngramConfig:
    return EngramConfig(layer_ids=(1,), num_embeddings=(N_ROWS,), max_ngram_size=3, n_heads=2, head_dim=8,
                        vocab_size=31, compressed_vocab_size=100, variant=variant, conv_kernel=4)


def make_layer(variant: str, n_streams: int = I) -> Engram:
    return Engram(make_cfg(variant), n_rows=N_ROWS, dim=D, n_streams=n_streams, norm_eps=EPS,
                  dtype=jnp.float32, row_multiple=ROW_MULTIPLE, name="engram")


def random_params(variant: str, n_streams: int = I, seed: int = 0) -> dict:
    """Tables N(0, 1), matrices N(0, 1/fan-in), norm weights 1 + N(0, 0.1), biases N(0, 0.1), the conv
    N(0, 0.5) (not its zero init: the conv must be live)."""
    rng, c = np.random.default_rng(seed), make_cfg(variant)
    X, J = c.mem_dim, n_streams
    normal = lambda shape, std: (std * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    p = {"table": normal((table_rows(N_ROWS, ROW_MULTIPLE), c.head_dim), 1.0)}
    if variant == "v41":
        p |= {"w_kv": normal((X, J + 1, D), X**-0.5), "q_weight": 1 + normal((J, D), 0.1),
              "k_weight": 1 + normal((J, D), 0.1)}
    else:
        p |= {"w_k": normal((X, J, D), X**-0.5), "b_k": normal((J, D), 0.1), "w_v": normal((X, D), X**-0.5),
              "b_v": normal((D,), 0.1), "conv": normal((c.conv_kernel, J, D), 0.5),
              **{n: 1 + normal((J, D), 0.1) for n in ("q_norm", "k_norm", "conv_norm")}}
    return {k: jnp.asarray(v) for k, v in p.items()}


def random_inputs(seed: int = 1, n_streams: int = I):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, n_streams, D)).astype(np.float32)
    rows = rng.integers(0, N_ROWS, (B, T, make_cfg("v41").n_columns)).astype(np.int32)
    return x, rows


@jax.jit(static_argnums=(0,))
def run(variant, params, x, rows, mask=MASK, segments=SEGMENTS, cache=None):
    layer = make_layer(variant, x.shape[2] if x.ndim == 4 else 1)
    return layer.apply({"params": params}, x, rows, mask, segments, cache)


# ----------------------------------------------------------------------------------------------
# numpy float64 statement (official / demo layouts: wkv [(I+1)·D, X] out-in, Conv1d weight [I·D, 1, W])


def np_rms(a, w=1.0):
    return a / np.sqrt(np.mean(a**2, -1, keepdims=True) + EPS) * w


def np_gate(dot):
    return 1 / (1 + np.exp(-np.sign(dot) * np.sqrt(np.maximum(np.abs(dot), 1e-6))))


def np_memory(p, rows):
    return np.asarray(p["table"], np.float64)[rows].reshape(*rows.shape[:2], -1)  # [B, T, X], column order


def np_v41(p, x, rows, mask):
    e, n = np_memory(p, rows), x.shape[2]
    wkv = np.asarray(p["w_kv"], np.float64).reshape(e.shape[-1], -1).T  # the official [(I+1)·D, X]
    kv = e @ wkv.T
    v, out = kv[..., n * D:], np.array(x, np.float64)
    for m in range(n):
        h, k = out[:, :, m], kv[..., m * D:(m + 1) * D]
        w = np.asarray(p["q_weight"][m], np.float64) * np.asarray(p["k_weight"][m], np.float64)
        dot = (h * w * k).sum(-1) / np.sqrt(np.mean(h**2, -1) + EPS) / np.sqrt(np.mean(k**2, -1) + EPS) / np.sqrt(D)
        out[:, :, m] += np.where(mask, np_gate(dot), 0)[..., None] * v
    return out


def np_short_conv(u, p, segments, dilation):
    """torch: per-stream RMSNorm, Conv1d(groups = I·D, padding (W−1)·δ, truncated to T), SiLU; taps that
    fall before the sequence or into another segment read zero."""
    n = np_rms(u, np.asarray(p["conv_norm"], np.float64))
    Bn, Tn, J, _ = u.shape
    w = np.asarray(p["conv"], np.float64).reshape(-1, J * D).T[:, None, :]  # the torch weight [I·D, 1, W]
    flat, W = n.reshape(Bn, Tn, J * D), w.shape[-1]
    y = np.zeros_like(flat)
    for b in range(Bn):
        for t in range(Tn):
            for j in range(W):
                s = t + j * dilation - (W - 1) * dilation
                if s >= 0 and segments[b, s] == segments[b, t]:
                    y[b, t] += w[:, 0, j] * flat[b, s]
    return (y / (1 + np.exp(-y))).reshape(u.shape)


def np_paper(p, x, rows, mask, segments):
    e, n = np_memory(p, rows), x.shape[2]
    f = {k: np.asarray(v, np.float64) for k, v in p.items()}
    v = e @ f["w_v"] + f["b_v"]
    gated = np.zeros((*x.shape[:2], n, D))
    for m in range(n):
        k = e @ f["w_k"][:, m] + f["b_k"][m]
        dot = (np_rms(x[:, :, m].astype(np.float64), f["q_norm"][m]) * np_rms(k, f["k_norm"][m])).sum(-1) / np.sqrt(D)
        gated[:, :, m] = np.where(mask, np_gate(dot), 0)[..., None] * v
    y = gated + np_short_conv(gated, p, segments, make_cfg("paper").max_ngram_size)
    return x + np.where(mask[..., None, None], y, 0)


REFERENCE = {"v41": lambda p, x, rows, mask, seg: np_v41(p, x, rows, mask), "paper": np_paper}


# ----------------------------------------------------------------------------------------------
# Single device


def test_lookup_matches_take_and_zeros_out_of_range():
    table = jnp.asarray(np.random.default_rng(0).standard_normal((10, 3)), jnp.float32)
    rows = jnp.array([[[0, 9], [4, 10]], [[-1, 3], [2, 2]]], jnp.int32)
    got = np.asarray(lookup(table, rows))
    want = np.where(((rows >= 0) & (rows < 10))[..., None], np.asarray(table)[np.clip(rows, 0, 9)], 0)
    np.testing.assert_array_equal(got, want)
    assert lookup(table, rows, jnp.bfloat16).dtype == jnp.bfloat16


def test_table_in_host_memory_is_refused():
    """XLA:CPU lists a pinned_host memory (the same RAM); a gather cannot read it, so lookup says so."""
    table = jax.device_put(jnp.ones((8, 2)), jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                                               memory_kind="pinned_host"))
    with pytest.raises(NotImplementedError, match="host memory"):
        jax.jit(lookup)(table, jnp.zeros((1, 2, 3), jnp.int32))


@pytest.mark.parametrize("variant", ["v41", "paper"])
def test_matches_numpy(variant):
    params, (x, rows) = random_params(variant), random_inputs()
    got, cache = run(variant, params, x, rows)
    assert cache is None
    assert_close(got, REFERENCE[variant](params, x, rows, MASK, SEGMENTS), **TOL["layer_f32"], what=variant)
    assert not np.allclose(got, x)  # the update is live


@pytest.mark.parametrize("variant", ["v41", "paper"])
def test_plain_residual_is_one_stream(variant):
    params, (x, rows) = random_params(variant, n_streams=1), random_inputs(n_streams=1)
    got, _ = run(variant, params, x[:, :, 0], rows)
    assert got.shape == (B, T, D)
    np.testing.assert_array_equal(got, run(variant, params, x, rows)[0][:, :, 0])
    assert_close(got, REFERENCE[variant](params, x, rows, MASK, SEGMENTS)[:, :, 0], **TOL["layer_f32"])


@pytest.mark.parametrize("variant", ["v41", "paper"])
def test_gate_mask_is_identity(variant):
    params, (x, rows) = random_params(variant), random_inputs()
    np.testing.assert_array_equal(run(variant, params, x, rows, mask=np.zeros((B, T), bool))[0], x)
    got = np.asarray(run(variant, params, x, rows)[0])
    np.testing.assert_array_equal(got[~MASK], x[~MASK])  # the padding rows are untouched


@pytest.mark.parametrize("variant", ["v41", "paper"])
def test_causal_and_segment_bound(variant):
    """Changing the ids at t0 changes no output before t0 nor any in another segment; a packed second
    document equals the same document run alone."""
    params, (x, rows) = random_params(variant), random_inputs()
    t0 = 5
    other = rows.copy()
    other[:, t0:] = (other[:, t0:] + 7) % N_ROWS
    a, b = (np.asarray(run(variant, params, x, r)[0]) for r in (rows, other))
    np.testing.assert_array_equal(a[:, :t0], b[:, :t0])
    assert not np.allclose(a[0, t0], b[0, t0])
    # row 0 = documents [0, 9) and [9, 14): the second, alone, is the same
    alone, _ = run(variant, params, x[:1, 9:], rows[:1, 9:], MASK[:1, 9:], SEGMENTS[:1, 9:])
    assert_close(alone, a[:1, 9:], **TOL["resharded_f32"], what="document run alone")


def test_paper_chunked_decode_equals_full_forward():
    params, (x, rows) = random_params("paper"), random_inputs()
    cfg = make_cfg("paper")
    full, _ = run("paper", params, x, rows)
    cache, outs, start = init_engram_cache(cfg, I, D, B, jnp.float32), [], 0
    assert cache.values.shape == (B, (cfg.conv_kernel - 1) * cfg.max_ngram_size, I, D)
    for n in (7, 5, 1, 1):
        chunk = slice(start, start + n)
        y, cache = run("paper", params, x[:, chunk], rows[:, chunk], MASK[:, chunk], SEGMENTS[:, chunk], cache)
        outs.append(y)
        start += n
    assert_close(np.concatenate(outs, 1), full, **TOL["resharded_f32"], what="7 + 5 + 1 + 1 chunks")
    assert init_engram_cache(make_cfg("v41"), I, D, B) is None


@pytest.mark.parametrize("variant", ["v41", "paper"])
def test_init(variant):
    """Names, shapes and logical axes; padding rows zero; the paper's conv zero, so Y = g·v at start."""
    x, rows = random_inputs()
    boxed = make_layer(variant).init(jax.random.key(0), x, rows)["params"]
    axes = {k: v.names for k, v in boxed.items()}
    params = nn.unbox(boxed)
    want = {k: v.shape for k, v in random_params(variant).items()}
    assert {k: v.shape for k, v in params.items()} == want
    assert axes["table"] == ("engram_rows", None) and all(a[-1] == "embed" for k, a in axes.items() if k != "table")
    assert params["table"].shape[0] == 192 and not np.any(params["table"][N_ROWS:])
    assert np.all(np.abs(params["table"][:N_ROWS]) > 0)
    if variant == "paper":
        assert not np.any(params["conv"])
        no_conv = dict(params, conv=jnp.zeros_like(params["conv"]))
        y, _ = run(variant, no_conv, x, rows)
        ref = np_paper(no_conv, x, rows, MASK, SEGMENTS)
        assert_close(y, ref, **TOL["layer_f32"])


# ----------------------------------------------------------------------------------------------
# 8 fake CPU devices (tests/conftest.py)


def mesh_from_file(name: str):
    cfg = load_config([CONFIGS / "model" / "tiny.yaml", CONFIGS / "mesh" / f"{name}.yaml"]).mesh
    return make_mesh(cfg, jax.devices()[:8]), rules(cfg)


def custom_mesh():
    """The batch over data, the table over fsdp only: ids stay split over data inside the shard_map."""
    cfg = MeshConfig(axes=MESH_AXES, shape=(2, 4, 1, 1, 1), rules=(
        ("act_batch", "data"), ("engram_rows", "fsdp"), *((n, None) for n in ("act_seq", "act_embed", "embed"))))
    return make_mesh(cfg, jax.devices()[:8]), rules(cfg)


def table_collectives(hlo: str, rows: int) -> list[str]:
    """Collectives whose result has all the table's rows (a gathered table or a full-size gradient)."""
    kinds = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("
    return [ln.strip()[:160] for ln in hlo.splitlines()
            if (m := re.search(kinds, ln)) and re.search(rf"\[{rows},", ln[:m.start()])]


@pytest.mark.multidevice
@pytest.mark.parametrize("layout,shards", [("fsdp_ep", 8), ("fsdp_tp", 8), ("custom", 4)])
def test_sharded_lookup(layout, shards):
    """Value and table gradient equal the single-device ones; the compiled step gathers the int32 ids
    and all-reduces looked-up rows, and no collective moves a whole table (gathered or as a gradient)."""
    mesh, mesh_rules = custom_mesh() if layout == "custom" else mesh_from_file(layout)
    rng = np.random.default_rng(0)
    R, H = table_rows(N_ROWS, ROW_MULTIPLE), 8
    table = jnp.asarray(rng.standard_normal((R, H)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, N_ROWS, (8, 6, 4)), jnp.int32)
    ct = jnp.asarray(rng.standard_normal((8, 6, 4, H)), jnp.float32)
    loss = lambda t, r: jnp.sum(lookup(t, r) * ct)  # noqa: E731
    want, want_grad = lookup(table, rows), jax.grad(loss)(table, rows)
    with activate(mesh, mesh_rules):
        sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("engram_rows", None), mesh, mesh_rules)
        table_sh = jax.device_put(table, sharding)
        batch = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("act_batch"), mesh, mesh_rules)
        rows = jax.device_put(rows, batch)  # split like a batch: over the table's axes too, but in custom
        assert {s.data.shape for s in table_sh.addressable_shards} == {(R // shards, H)}
        out_shardings = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), sharding)  # as training
        step = jax.jit(jax.value_and_grad(loss), out_shardings=out_shardings).lower(table_sh, rows).compile()
        (_, got_grad), got = step(table_sh, rows), jax.jit(lookup)(table_sh, rows)
    np.testing.assert_array_equal(got, want)
    assert_close(got_grad, want_grad, **TOL["resharded_f32"], what="table gradient")
    hlo = step.as_text()
    assert not table_collectives(hlo, R), table_collectives(hlo, R)
    if layout != "custom":  # the batch is split over the table's axes: the ids are gathered
        assert re.search(r"all-gather(-start)?\(", hlo), "no all-gather of the ids"
    assert re.search(r"all-reduce(-start)?\(", hlo), "no all-reduce of the looked-up rows"
    assert got_grad.sharding.is_equivalent_to(sharding, 2)  # the gradient stays in row blocks


@pytest.mark.multidevice
def test_sharded_layer_matches_single_device():
    """The whole v41 layer, parameters sharded by the fsdp_ep rules: the same streams and gradients."""
    params, (x, rows) = random_params("v41"), random_inputs()
    layer = make_layer("v41")
    x8, rows8 = np.concatenate([x] * 4), np.concatenate([rows] * 4)  # B = 8 splits over 8 devices
    mask8, seg8 = np.concatenate([MASK] * 4), np.concatenate([SEGMENTS] * 4)

    def loss(p, x):
        y, _ = layer.apply({"params": p}, x, rows8, mask8, seg8)
        return jnp.sum(y**2), y

    (_, want), want_grad = jax.value_and_grad(loss, has_aux=True)(params, x8)
    mesh, mesh_rules = mesh_from_file("fsdp_ep")
    with activate(mesh, mesh_rules):
        boxed = layer.init(jax.random.key(0), x8, rows8)["params"]
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, mesh_rules)
        (_, got), got_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jax.device_put(params, shardings), x8)
    assert_close(got, want, **TOL["resharded_f32"], what="streams")
    for k in params:  # sums over the 8 batch shards in another order: compared at each gradient's scale
        assert_close_to_scale(got_grad[k], want_grad[k], TOL["resharded_f32"]["rtol"], what=f"grad {k}")
