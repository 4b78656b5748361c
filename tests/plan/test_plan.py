"""deepseek_jax/plan/: the HLO collective parser, plan() on the tiny model, the plan CLI, and the
sharding-ablation script's core function."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import cli
from deepseek_jax.config import load_config
from deepseek_jax.models import router_bias_rows
from deepseek_jax.params import param_shapes
from deepseek_jax.plan import (
    CPU_PLAN_COMPILER_OPTIONS,
    KINDS,
    PlanError,
    Volume,
    collectives,
    estimate,
    format_report,
    plan,
    shape_bytes,
    state_memory,
)
from deepseek_jax.program import build_program
from deepseek_jax.sharding import abstract_mesh, rules
from tests.utils import ROOT, TOL, assert_close

MODEL = ROOT / "configs" / "model"
MESH = ROOT / "configs" / "mesh"
# the tiny model cut to one dense and one MoE block, so a compile stays short
SMALL = ["model.n_layers=2", "model.n_dense_layers=1", "model.num_nextn_predict_layers=0", "model.vocab_size=512",
         "data.global_batch_size=8", "data.seq_len=16"]

HLO = """HloModule m, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%wrapped_a2a (p: bf16[4,64]) -> bf16[4,64] {
  %p = bf16[4,64]{1,0} parameter(0)
  ROOT %a2a = bf16[4,64]{1,0} all-to-all(%p), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
}

%called (q: f32[16,8]) -> f32[16,8] {
  %q = f32[16,8]{1,0} parameter(0)
  ROOT %cp = f32[16,8]{1,0} collective-permute(%q), channel_id=7, source_target_pairs={{0,1},{1,0}}
}

%body (t: (s32[], f32[16,8])) -> (s32[], f32[16,8]) {
  %t = (s32[], f32[16,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[16,8]{1,0} get-tuple-element(%t), index=1
  %ag = f32[64,8]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[16,8]{1,0} reduce-scatter(%ag), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %out = (s32[], f32[16,8]{1,0}) tuple(%i, %rs)
}

%cond (t: (s32[], f32[16,8])) -> pred[] {
  %t = (s32[], f32[16,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[16,8], y: bf16[2,2], z: bf16[4,64]) -> (s32[], f32[16,8]) {
  %x = f32[16,8]{1,0} parameter(0)
  %y = bf16[2,2]{1,0} parameter(1)
  %z = bf16[4,64]{1,0} parameter(2)
  %ars = f32[16,8]{1,0} all-reduce-start(%x), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %ard = f32[16,8]{1,0} all-reduce-done(%ars)
  %tup = (f32[16,8]{1,0}, bf16[2,2]{1,0}) all-reduce(%ard, %y), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  %cps = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=6, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[16,8]{1,0} collective-permute-done(%cps)
  %as = ((bf16[4,64]{1,0}), bf16[4,64]{1,0}, s32[]) async-start(%z), calls=%wrapped_a2a
  %ad = bf16[4,64]{1,0} async-done(%as), calls=%wrapped_a2a
  %called = f32[16,8]{1,0} call(%cpd), to_apply=%called
  %zero = s32[] constant(0)
  %init = (s32[], f32[16,8]{1,0}) tuple(%zero, %called)
  ROOT %w = (s32[], f32[16,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
}
"""


def test_shape_bytes():
    assert shape_bytes("(f32[8,128]{1,0}, s32[])") == 8 * 128 * 4 + 4
    assert shape_bytes("pred[3]") == 3 and shape_bytes("bf16[<=10,2]") == 40
    assert shape_bytes("f32[8,128]{1,0:T(8,128)}") == 4096  # a TPU tiled layout's parentheses
    assert shape_bytes("((bf16[4,64]{1,0}), f8e4m3fn[4,64]{1,0}, s32[])") == 512 + 256 + 4


def test_collectives_in_hand_written_hlo():
    got = collectives(HLO)
    assert set(got) == set(KINDS)
    assert got["all-gather"] == Volume(5, 5 * 64 * 8 * 4)  # in the while body: x known_trip_count
    assert got["reduce-scatter"] == Volume(5, 5 * 16 * 8 * 4)
    assert got["all-reduce"] == Volume(2, 16 * 8 * 4 + (16 * 8 * 4 + 2 * 2 * 2))  # async pair once; tuple summed
    assert got["collective-permute"] == Volume(2, 2 * 16 * 8 * 4)  # -done's shape (not -start's tuple); a call
    assert got["all-to-all"] == Volume(1, 4 * 64 * 2)  # inside an async wrapper computation, once
    once = collectives(HLO, multiply_trip_counts=False)
    assert once["all-gather"] == Volume(1, 64 * 8 * 4) and once["all-to-all"] == got["all-to-all"]


@pytest.mark.multidevice
def test_collectives_of_a_compiled_shard_map():
    """psum, all_gather, psum_scatter, all_to_all and ppermute, one of each; a psum in a 6-step loop."""
    n = 8
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("x",))

    def body(a_RC):  # local [8, 16] float32 shard of a [64, 16] array
        rolled = jax.lax.fori_loop(0, 6, lambda i, v: v * 0.5 + jax.lax.psum(v, "x"), a_RC[:1])
        return (jax.lax.psum(a_RC, "x"), jax.lax.all_gather(a_RC, "x", tiled=True),
                jax.lax.psum_scatter(a_RC, "x", tiled=True), jax.lax.all_to_all(a_RC, "x", 0, 0, tiled=True),
                jax.lax.ppermute(a_RC, "x", [(i, (i + 1) % n) for i in range(n)]), rolled)

    out_specs = (P(), P("x"), P("x"), P("x"), P("x"), P("x"))
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=out_specs))
    x = jax.device_put(jnp.ones((64, 16), jnp.float32), NamedSharding(mesh, P("x")))
    got = collectives(f.lower(x).compile().as_text())
    local = 8 * 16 * 4
    assert got["all-gather"] == Volume(1, n * local)
    assert got["reduce-scatter"] == Volume(1, local // n)
    assert got["all-to-all"] == Volume(1, local)
    assert got["collective-permute"] == Volume(1, local)
    assert got["all-reduce"] == Volume(1 + 6, local + 6 * 16 * 4)  # the loop's psum x its trip count


@pytest.mark.multidevice
@pytest.mark.slow
def test_plan_tiny_fsdp_compiled():
    cfg = load_config([MODEL / "tiny.yaml", MESH / "fsdp.yaml"], SMALL)
    got = plan(cfg, 8, compile=True)
    lowered = state_memory(build_program(cfg, abstract_mesh(cfg.mesh, 8), rules(cfg.mesh)))  # no devices
    m = got.memory
    assert got.method == "compiled" and got.mesh_shape["fsdp"] == 8
    # every f32 weight split 8 ways; the count also holds the selection biases (router collection, not params)
    biases = sum(len(b.rows) if isinstance(b.rows, tuple) else 1 for b in router_bias_rows(cfg.model))
    n_params = got.params["total"] - biases * cfg.model.moe.n_routed_experts
    assert m["params"] * 8 == m["params_unsharded"] == 4 * n_params
    assert m["optimizer"] == pytest.approx(2 * m["params"], abs=64)  # AdamW's two moments (+ a step count)
    # the donated state is the executable's arguments and outputs: what the shardings say, up to the batch
    state = m["params"] + m["optimizer"] + m["other_state"]
    assert state <= m["argument"] <= state + m["batch"] + 1024 and m["alias"] >= 0.99 * state
    assert m["temp"] > 0 and m["peak_estimate"] >= m["argument"]
    assert {k: m[k] for k in ("params", "optimizer", "other_state")} == {
        k: lowered[k] for k in ("params", "optimizer", "other_state")}
    # FSDP gathers the weights (forward and backward) and reduces the gradients
    assert got.collectives["all-gather"].count > 0 and got.collectives["all-gather"].bytes >= m["params_unsharded"]
    assert got.estimate["all-gather"].bytes == 2 * m["params_unsharded"]
    assert got.params["total"] > got.params["active"] > 0
    text = format_report(got)
    assert "compiled" in text and "all-gather" in text and "temporaries" in text


@pytest.mark.multidevice
@pytest.mark.slow
def test_plan_lowered_needs_no_devices():
    """64 devices on an 8-device host: lowered on an abstract mesh, collectives estimated."""
    cfg = load_config([MODEL / "tiny.yaml", MESH / "fsdp_ep.yaml"], SMALL)
    with pytest.raises(PlanError, match="global_batch_size=8 does not split over the 64 devices"):
        plan(cfg, 64, compile=False)
    cfg = load_config([MODEL / "tiny.yaml", MESH / "fsdp_ep.yaml"], [*SMALL, "data.global_batch_size=64"])
    got = plan(cfg, 64, compile=None)
    assert got.method == "lowered" and got.collectives is None and "lowered, not compiled" in got.notes[0]
    assert got.mesh_shape["fsdp"] * got.mesh_shape["expert"] == 64
    assert got.memory["params"] < got.memory["params_unsharded"] / 16
    with pytest.raises(PlanError, match="needs 64"):
        plan(cfg, 64, compile=True)


@pytest.mark.slow
def test_plan_cli_on_671b_lowering_only(capsys):
    rc = cli.main(["plan", str(MODEL / "deepseek_v3_671b.yaml"), "--mesh", str(MESH / "fsdp_ep.yaml"),
                   "--devices", "32", "--lower-only", "data.global_batch_size=32", "data.seq_len=512"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "method: lowered" in out and "ESTIMATE" in out and "fsdp=8" in out and "expert=4" in out
    assert "total 682.6" in out  # 671B main model + the MTP module's own weights
    assert "all-gather" in out and "reduce-scatter" in out


def test_plan_cli_errors(capsys):
    rc = cli.main(["plan", str(MODEL / "tiny.yaml"), "--mesh", str(MESH / "fsdp_ep.yaml"), "--devices", "6",
                   "--lower-only"])
    assert rc == 2 and "error: mesh.shape" in capsys.readouterr().err


@pytest.mark.multidevice
@pytest.mark.slow
def test_ablation_core_on_two_meshes():
    spec = importlib.util.spec_from_file_location("sharding_ablation", ROOT / "experiments" / "sharding_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    overrides = [o for o in SMALL if not o.startswith("data.")]
    rows = ablation.ablate(str(MODEL / "tiny.yaml"), [str(MESH / "single.yaml"), str(MESH / "fsdp.yaml")],
                           8, 8, 16, 1, overrides, CPU_PLAN_COMPILER_OPTIONS)
    single, fsdp = rows
    assert single["mesh"] == "single" and fsdp["mesh"] == "fsdp"
    assert fsdp["memory"]["params"] * 8 == single["memory"]["params"]
    assert sum(v.count for v in single["collectives"].values()) == 0  # one device: nothing to communicate
    assert fsdp["collectives"]["all-gather"].count > 0
    assert_close(fsdp["loss"], single["loss"], **TOL["resharded_f32"], what="first-step loss")
    assert single["step_s"] > 0 and fsdp["compile_s"] > 0
    assert "| fsdp |" in ablation.markdown_table(rows)


@pytest.mark.multidevice
@pytest.mark.slow  # ~18 s: the abstract V4.1-Flash program
def test_plan_reports_engram_tables_per_device():
    """V4.1-Flash on 256 devices (fsdp_ep: tables split over all of them), lowered on an abstract mesh:
    the Engram rows per device are the 196.6B real rows (plus padding to 1024-row blocks) / 256, f32."""
    cfg = load_config([MODEL / "deepseek_v41_flash.yaml", MESH / "fsdp_ep.yaml"],
                      ["data.global_batch_size=256", "data.seq_len=64"])
    m = state_memory(build_program(cfg, abstract_mesh(cfg.mesh, 256), rules(cfg.mesh)))
    rows = sum(-(-n // 1024) * 1024 for n in cfg.model.engram.num_embeddings)
    assert m["engram_tables"] == rows * 256 * 4 // 256  # 2.86 GiB
    assert m["engram_tables"] < m["params"]
    print(f"V4.1-Flash on fsdp_ep x256: Engram tables {m['engram_tables'] / 2**30:.2f} GiB of "
          f"{m['params'] / 2**30:.2f} GiB parameters per device")


# the tiny multimodal model (ViT + aligner, audio, video delimiters) on 8 devices of fsdp.yaml, a text batch;
# with MEDIA_BATCH the batch carries images / video / audio (data.media) as the demo's does
MULTIMODAL = ["data.global_batch_size=8", "data.seq_len=32"]
NO_FRONT_ENDS = ["model.vision=null", "model.video=null", "model.audio=null"]
MEDIA_BATCH = ["data.source=demo_media", "data.media={max_image_rows: 8, max_audio_clips: 1}"]


def _multimodal(*overrides):
    return load_config([MODEL / "tiny_multimodal.yaml", MESH / "fsdp.yaml"], [*MULTIMODAL, *overrides])


def test_estimate_moves_media_weights_only_for_media_batches():
    """A text batch never runs the media front-ends, so their weights move nowhere (the compiled check
    below); with data.media each is handled as any FSDP weight: split on `embed` -> gathered forward
    and backward (2 × its f32 bytes), gradient reduce-scattered (1/8 of them); unsplit -> all-reduced."""
    est = {}
    for name, extra in (("text", []), ("no_front_ends", NO_FRONT_ENDS), ("media", MEDIA_BATCH)):
        cfg = _multimodal(*extra)
        est[name] = estimate(build_program(cfg, abstract_mesh(cfg.mesh, 8), rules(cfg.mesh)))
    assert est["text"] == est["no_front_ends"]
    media = [(math.prod(shape), shape[0] if "layers" in axes else 1, "embed" in axes)
             for name, (shape, axes) in param_shapes(_multimodal().model).items() if name.startswith("media/")]
    # split on embed: all but the ViT's b_qkv (heads) and the `mlp`-only aligner b1, convolutions and their biases
    assert len(media) == 31 and sum(split for *_, split in media) == 25
    split, whole = [(n, k) for n, k, s in media if s], [(n, k) for n, k, s in media if not s]
    want = {"all-gather": (sum(2 * k for _, k in split), sum(2 * 4 * n for n, _ in split)),  # f32, gathered 8-way
            "reduce-scatter": (sum(k for _, k in split), sum(4 * n // 8 for n, _ in split)),
            "all-reduce": (sum(k for _, k in whole), sum(4 * n for n, _ in whole))}
    for kind, (count, nbytes) in want.items():
        got = est["media"][kind].count - est["text"][kind].count, est["media"][kind].bytes - est["text"][kind].bytes
        assert got == (count, nbytes), f"{kind}: the media weights add {got}, want {(count, nbytes)}"


@pytest.mark.multidevice
@pytest.mark.slow  # three compiles of the tiny multimodal step on 8 devices (~8 s; ~40 s on a busy host)
def test_compiled_text_step_moves_no_media_weights():
    """The compiled step of the multimodal model on a text batch holds exactly the collectives of the
    same model without media front-ends (XLA drops the unread weights), and the estimate agrees."""
    configs = [_multimodal(*extra) for extra in ([], NO_FRONT_ENDS)]
    with_fe, without = (plan(cfg, 8, compile=True) for cfg in configs)
    assert with_fe.estimate == without.estimate
    # The update's finiteness check (train.all_finite) reads every state leaf: each media leaf adds one
    # predicate byte to an all-reduce the step already has (the same count), and no weight moves.
    leaves = [len(jax.tree.leaves(build_program(cfg, abstract_mesh(cfg.mesh, 8), rules(cfg.mesh)).abstract_state))
              for cfg in configs]
    extra = with_fe.collectives["all-reduce"].bytes - without.collectives["all-reduce"].bytes
    assert with_fe.collectives["all-reduce"].count == without.collectives["all-reduce"].count
    assert 0 < extra <= leaves[0] - leaves[1], (extra, leaves)
    assert {k: v for k, v in with_fe.collectives.items() if k != "all-reduce"} == \
        {k: v for k, v in without.collectives.items() if k != "all-reduce"}
    assert with_fe.memory["params"] > without.memory["params"]  # the front-ends' weights are still held
    media = plan(_multimodal(*MEDIA_BATCH), 8, compile=True)
    assert media.collectives["all-gather"].count > with_fe.collectives["all-gather"].count
