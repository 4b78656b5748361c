"""The strict YAML loader and the config invariants (deepseek_jax/config/).

Every error test matches the message, so a loader that raises for the wrong reason, or names the
wrong key or file, fails. YAML files are written under tmp_path.
"""

import copy
import re
from pathlib import Path

import pytest
import yaml

from deepseek_jax.config import (
    Config,
    ConfigError,
    load_config,
    load_model_config,
    parse_override,
    to_yaml,
)
from tests.utils import CONFIGS

# A small valid model section (E=16 in P=4 groups of 4, top-4 from 2 groups, 4 layers, 1 dense).
MODEL = {
    "vocab_size": 256, "dim": 64, "inter_dim": 128, "n_layers": 4, "n_dense_layers": 1,
    "mla": {
        "n_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    },
    "moe": {
        "n_routed_experts": 16, "n_activated_experts": 4, "n_expert_groups": 4,
        "n_limited_groups": 2, "moe_inter_dim": 32,
    },
}


def write(path: Path, data) -> Path:
    """Writes `data` (a dict, dumped as YAML, or raw text) to `path`; returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def model_file(tmp_path: Path, name: str = "model.yaml", **changes) -> Path:
    """A valid config file with top-level model fields replaced by `changes`."""
    return write(tmp_path / name, {"model": {**copy.deepcopy(MODEL), **changes}})


def raises(pattern: str):
    return pytest.raises(ConfigError, match=pattern)


# Unknown keys
def test_unknown_key_names_key_file_and_nearest(tmp_path):
    data = {"model": copy.deepcopy(MODEL)}
    data["model"]["moe"]["n_routed_expert"] = data["model"]["moe"].pop("n_routed_experts")
    path = write(tmp_path / "typo.yaml", data)
    with raises(r"unknown config key 'model\.moe\.n_routed_expert'") as err:
        load_config([path])
    assert path.name in str(err.value)
    assert re.search(r"did you mean n_routed_experts\b", str(err.value))


def test_unknown_section_suggests_the_section(tmp_path):
    path = write(tmp_path / "a.yaml", {"modle": MODEL})
    with raises(r"unknown config key 'modle'.*did you mean model"):
        load_config([path])


def test_unknown_key_without_near_match_lists_valid_keys(tmp_path):
    path = write(tmp_path / "a.yaml", {"model": MODEL, "data": {"zzzz": 1}})
    with raises(r"unknown config key 'data\.zzzz'.*valid keys: source, format, jsonl_field"):
        load_config([path])


def test_unknown_key_in_included_file_names_that_file(tmp_path):
    model_file(tmp_path, "base.yaml")
    write(tmp_path / "parts" / "bad.yaml", {"model": {"moe": {"n_routed_expert": 8}}})
    top = write(tmp_path / "top.yaml", {"include": ["base.yaml", "parts/bad.yaml"]})
    with raises(r"unknown config key 'model\.moe\.n_routed_expert'") as err:
        load_config([top])
    assert "parts/bad.yaml" in str(err.value), str(err.value)


def test_unknown_key_via_override_names_the_override(tmp_path):
    with raises(r"unknown config key 'model\.moe\.n_routed_expert' \(from override "
                r"'model\.moe\.n_routed_expert=8'\).*did you mean n_routed_experts"):
        load_config([model_file(tmp_path)], ["model.moe.n_routed_expert=8"])


def test_unknown_section_via_override(tmp_path):
    with raises(r"unknown config key 'foo'"):
        load_config([model_file(tmp_path)], ["foo.bar=1"])


# include: merging
def test_includes_merge_left_to_right_and_including_file_wins(tmp_path):
    model_file(tmp_path, "base.yaml")
    write(tmp_path / "a.yaml", {"model": {"dim": 96}})
    write(tmp_path / "b.yaml", {"model": {"dim": 128}})
    ab = write(tmp_path / "ab.yaml", {"include": ["base.yaml", "a.yaml", "b.yaml"]})
    ba = write(tmp_path / "ba.yaml", {"include": ["base.yaml", "b.yaml", "a.yaml"]})
    own = write(tmp_path / "own.yaml", {"include": ["base.yaml", "a.yaml"], "model": {"dim": 32}})
    assert load_config([ab]).model.dim == 128
    assert load_config([ba]).model.dim == 96
    assert load_config([own]).model.dim == 32


def test_include_merge_is_deep(tmp_path):
    model_file(tmp_path, "base.yaml")
    top = write(tmp_path / "top.yaml", {"include": "base.yaml", "model": {"mla": {"n_heads": 8}}})
    mla = load_config([top]).model.mla
    assert mla.n_heads == 8
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.v_head_dim) == (32, 16, 16)


def test_nested_includes_resolve_relative_to_the_including_file(tmp_path, monkeypatch):
    model = copy.deepcopy(MODEL)
    moe, mla = model.pop("moe"), model.pop("mla")
    write(tmp_path / "parts" / "moe.yaml", {"model": {"moe": moe}})
    write(tmp_path / "model" / "mla.yaml", {"model": {"mla": mla}})
    base = {"include": ["mla.yaml", "../parts/moe.yaml"], "model": model}
    write(tmp_path / "model" / "base.yaml", base)
    top = {"include": "../model/base.yaml", "train": {"steps": 7}}
    top = write(tmp_path / "exp" / "top.yaml", top)
    monkeypatch.chdir(tmp_path / "parts")  # relative to the files, not the working directory
    cfg = load_config([top])
    assert cfg.model.moe.n_routed_experts == 16 and cfg.model.mla.n_heads == 2
    assert cfg.train.steps == 7


def test_diamond_include_is_not_a_cycle(tmp_path):
    model_file(tmp_path, "base.yaml")
    write(tmp_path / "a.yaml", {"include": ["base.yaml"]})
    write(tmp_path / "b.yaml", {"include": ["base.yaml"], "model": {"dim": 32}})
    top = write(tmp_path / "top.yaml", {"include": ["a.yaml", "b.yaml"]})
    assert load_config([top]).model.dim == 32


def test_include_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", {"include": ["sub/b.yaml"]})
    write(tmp_path / "sub" / "b.yaml", {"include": ["../a.yaml"]})
    with raises(r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config([a])


def test_self_include_is_a_cycle(tmp_path):
    with raises(r"include cycle: .*a\.yaml -> .*a\.yaml"):
        load_config([write(tmp_path / "a.yaml", {"include": "a.yaml"})])


def test_missing_include_names_the_file(tmp_path):
    top = write(tmp_path / "top.yaml", {"include": ["nope.yaml"]})
    with raises(r"config file not found: .*nope\.yaml"):
        load_config([top])


def test_bad_yaml_and_non_mapping_are_errors(tmp_path):
    with raises(r"bad\.yaml: not valid YAML: .* at line 2, column 1$") as err:
        load_config([write(tmp_path / "bad.yaml", "model: [unclosed\n")])
    assert "\n" not in str(err.value)  # one line, not PyYAML's multi-line report
    with raises(r"list\.yaml: top level must be a mapping, got list"):
        load_config([write(tmp_path / "list.yaml", "- 1\n- 2\n")])


def test_several_files_merge_left_to_right(tmp_path):
    base = model_file(tmp_path, "base.yaml")
    mesh = write(tmp_path / "m.yaml", {"mesh": {"shape": [1, -1, 1, 2, 1]}, "model": {"dim": 32}})
    cfg = load_config([base, mesh])
    assert cfg.mesh.shape == (1, -1, 1, 2, 1) and cfg.model.dim == 32
    assert load_config([mesh, base]).model.dim == 64


def test_load_model_config_ignores_other_sections(tmp_path):
    path = write(tmp_path / "run.yaml", {"model": MODEL, "train": {"steps": 3}})
    assert load_model_config([path]).dim == 64
    with raises(r"no `model:` section"):
        load_model_config([write(tmp_path / "train.yaml", {"train": {"steps": 3}})])


# a.b=value overrides
def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(
        [model_file(tmp_path)],
        [
            "model.dim=96",  # int
            "model.rope.rope_factor=4.5",  # float, into a section the file does not have
            "model.moe.norm_topk_prob=false",  # bool
            "model.dtype=float32",  # string
            "mesh.shape=[1, -1, 1, 2, 1]",  # list -> tuple
            "model.rope.rope_theta=50000",  # int for a float field
        ],
    )
    assert cfg.model.dim == 96
    assert cfg.model.rope.rope_factor == 4.5
    assert cfg.model.moe.norm_topk_prob is False
    assert cfg.model.dtype == "float32"
    assert cfg.mesh.shape == (1, -1, 1, 2, 1)
    assert cfg.model.rope.rope_theta == 50000.0 and isinstance(cfg.model.rope.rope_theta, float)


def test_override_beats_file_and_later_override_beats_earlier(tmp_path):
    path = model_file(tmp_path, dim=128)
    assert load_config([path], ["model.dim=32", "model.dim=48"]).model.dim == 48


def test_parse_override():
    assert parse_override("a.b.c=1.5") == (["a", "b", "c"], 1.5)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    with raises(r"override 'model\.dim' is not of the form a\.b=value"):
        parse_override("model.dim")


def test_override_into_a_scalar_is_an_error(tmp_path):
    with raises(r"dim is not a section"):
        load_config([model_file(tmp_path)], ["model.dim.x=1"])


# Types
@pytest.mark.parametrize(
    "section, key, value, pattern",
    [
        ("model", "dim", "128", r"model\.dim \(from .*\): expected an integer, got '128'"),
        ("model", "n_layers", True, r"model\.n_layers \(from .*\): expected an integer, got True"),
        ("model", "dim", 7.5, r"model\.dim .*expected an integer, got 7\.5"),
        ("model", "norm_eps", "small", r"model\.norm_eps .*expected a number, got 'small'"),
        ("model", "norm_eps", False, r"model\.norm_eps .*expected a number, got False"),
        ("model", "dtype", "float16", r"model\.dtype .*'float16' is not one of \('bfloat16', 'fl"),
        ("model", "mla", 5, r"model\.mla: expected a mapping"),
        ("mla", "n_heads", "2", r"model\.mla\.n_heads .*expected an integer"),
        ("moe", "norm_topk_prob", 1, r"model\.moe\.norm_topk_prob .*expected true/false, got 1"),
        ("moe", "score_func", "relu", r"model\.moe\.score_func .*'relu' is not one of"),
        ("moe", "impl", "loop", r"model\.moe\.impl .*'loop' is not one of"),
    ],
)
def test_type_errors_name_the_field_and_file(tmp_path, section, key, value, pattern):
    data = {"model": copy.deepcopy(MODEL)}
    (data["model"] if section == "model" else data["model"][section])[key] = value
    path = write(tmp_path / "typed.yaml", data)
    with raises(pattern) as err:
        load_config([path])
    if "expected a mapping" not in pattern:
        assert path.name in str(err.value)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.run_dir=5", r"train\.run_dir .*expected a string, got 5"),
        ("mesh.shape=4", r"mesh\.shape .*expected a list, got 4"),
        ("mesh.shape=[1, x, 1, 1, 1]", r"mesh\.shape .*\[1\]: expected an integer, got 'x'"),
        ("optim.lr=fast", r"optim\.lr \(from override 'optim\.lr=fast'\): expected a number"),
        ("model.dim=", r"model\.dim .*expected an integer, got None"),
    ],
)
def test_type_errors_from_overrides(tmp_path, override, pattern):
    with raises(pattern):
        load_config([model_file(tmp_path)], [override])


# Invariants (__post_init__)

INVARIANTS = [
    # MoE
    ("model.moe.n_activated_experts=17", r"n_activated_experts \(17\) must be <= n_routed_experts"),
    ("model.moe.n_expert_groups=3", r"n_routed_experts \(16\) must be divisible by n_expert_gr"),
    ("model.moe.n_limited_groups=5", r"n_limited_groups \(5\) must be in \[1, n_expert_groups=4\]"),
    ("model.moe.n_limited_groups=0", r"n_limited_groups \(0\) must be in \[1, n_expert_groups=4\]"),
    ("model.moe.n_expert_groups=16", r"groups need >= 2 experts \(E/P = 1\)"),
    ("model.moe.n_activated_experts=9", r"experts \(9\) exceeds the experts in .* \(2 x 4\)"),
    ("model.moe.n_routed_experts=0", r"needs n_routed_experts > 0 and n_activated_experts > 0"),
    ("model.moe.n_activated_experts=0", r"needs n_routed_experts > 0 and n_activated_experts > 0"),
    ("model.moe.n_shared_experts=-1", r"moe\.n_shared_experts must be >= 0"),
    ("model.moe.moe_inter_dim=0", r"moe\.moe_inter_dim must be > 0"),
    # MLA
    ("model.mla.qk_rope_head_dim=7", r"qk_rope_head_dim must be even .*got 7"),
    ("model.mla.n_heads=0", r"mla\.n_heads must be > 0, got 0"),
    ("model.mla.kv_lora_rank=-4", r"mla\.kv_lora_rank must be > 0, got -4"),
    ("model.mla.q_lora_rank=-1", r"mla\.q_lora_rank must be >= 0, got -1"),
    # model
    ("model.n_dense_layers=5", r"n_dense_layers \(5\) must be in \[0, n_layers=4\]"),
    ("model.n_dense_layers=-1", r"n_dense_layers \(-1\) must be in \[0, n_layers=4\]"),
    ("model.vocab_size=0", r"model\.vocab_size must be > 0, got 0"),
    ("model.n_layers=0", r"model\.n_layers must be > 0, got 0"),
    ("model.max_seq_len=-8", r"model\.max_seq_len must be > 0, got -8"),
    ("model.num_nextn_predict_layers=-1", r"num_nextn_predict_layers must be >= 0"),
    ("model.norm_eps=0.0", r"model\.norm_eps must be > 0"),
    # RoPE / YaRN
    ("model.rope.rope_factor=0.5", r"rope\.rope_factor must be >= 1, got 0\.5"),
    ("model.rope.rope_theta=0", r"rope\.rope_theta must be > 0"),
    ("model.rope.original_seq_len=0", r"rope\.original_seq_len must be > 0"),
    ("model.rope.beta_fast=0.5", r"rope needs beta_fast > beta_slow > 0, got 0\.5, 1\.0"),
    ("model.rope.beta_slow=0.0", r"rope needs beta_fast > beta_slow > 0"),
    # mesh
    ("mesh.axes=[data, fsdp, expert, context, tensor]", r"mesh\.axes must be \['data', 'fs"),
    ("mesh.shape=[1, -1, 1, 1]", r"mesh\.shape needs 5 sizes"),
    ("mesh.shape=[-1, -1, 1, 1, 1]", r"mesh\.shape may hold at most one -1"),
    ("mesh.shape=[1, 0, 1, 1, 1]", r"mesh\.shape sizes must be > 0 or -1"),
    ("mesh.rules=[[embed]]", r"mesh\.rules entries are \[logical_name, mesh_axes\]"),
    ("mesh.rules=[[embedding, fsdp]]", r"mesh\.rules: unknown logical axis 'embedding'"),
    ("mesh.rules=[[embed, fdsp]]", r"mesh\.rules\[embed\]: unknown mesh axis 'fdsp'"),
    ("mesh.rules=[[act_batch, [data, tensr]]]", r"rules\[act_batch\]: unknown mesh axis 'tensr'"),
    # data / optim / train
    ("data.seq_len=0", r"data\.seq_len must be >= 2 .*, got 0"),
    ("data.seq_len=1", r"data\.seq_len must be >= 2 .*, got 1"),
    ("data.global_batch_size=0", r"data\.global_batch_size must be > 0, got 0"),
    ("data.shuffle_window=-1", r"data\.shuffle_window must be >= 0, got -1"),
    ("data.source=''", r"data\.source must name the data"),
    ("optim.lr=0.0", r"optim\.lr must be a finite number > 0, got 0\.0"),
    ("optim.lr=.inf", r"optim\.lr \(from override 'optim\.lr=\.inf'\): must be a finite number, got inf"),
    ("optim.lr=.nan", r"optim\.lr .*must be a finite number, got nan"),
    ("optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio must be in \[0, 1\]"),
    ("optim.warmup_steps=-1", r"optim\.warmup_steps must be >= 0, got -1"),
    ("optim.clip_norm=-1.0", r"optim\.clip_norm must be a finite number >= 0, got -1\.0"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay must be a finite number >= 0, got -0\.1"),
    ("optim.b1=1.0", r"optim\.b1 must be in \[0, 1\), got 1\.0"),
    ("optim.b2=-0.5", r"optim\.b2 must be in \[0, 1\), got -0\.5"),
    ("optim.eps=0", r"optim\.eps must be a finite number > 0, got 0\.0"),
    ("optim.name=sgd", r"optim\.name .*'sgd' is not one of \('adamw', 'muon'\)"),
    ("train.steps=0", r"train\.steps must be in \[1, 2\*\*31\) .*, got 0"),
    ("train.steps=[5]", r"train\.steps .*: expected an integer, got \[5\]"),
    ("train.stop_at=2000", r"train\.stop_at must be in \[0, train\.steps=1000\] .*, got 2000"),
    ("train.run_dir=''", r"train\.run_dir must name a directory"),
    ("train.sample_tokens=0", r"train\.sample_tokens must be > 0 with train\.sample_prompts"),
    ("train.sample_prompts=['']", r"train\.sample_prompts\[0\] must be a non-empty string"),
    ("train.mtp_loss_weight=-1", r"train\.mtp_loss_weight must be a finite number >= 0, got -1\.0"),
    ("model.moe.route_scale=0", r"moe\.route_scale must be > 0, got 0\.0"),
    ("model.norm_eps=.inf", r"model\.norm_eps .*must be a finite number, got inf"),
    ("train.steps=[1,", r"override 'train\.steps=\[1,': the value is not valid YAML \(.* at line 1, column 4\)"),
]


@pytest.mark.parametrize("override, pattern", INVARIANTS, ids=[o for o, _ in INVARIANTS])
def test_invariant_violations_are_config_errors(tmp_path, override, pattern):
    with raises(pattern):
        load_config([model_file(tmp_path)], [override])


def test_invariant_error_names_the_source_file(tmp_path):
    data = {"model": copy.deepcopy(MODEL)}
    data["model"]["moe"]["n_activated_experts"] = 17
    path = write(tmp_path / "bad_moe.yaml", data)
    with raises(r"must be <= n_routed_experts") as err:
        load_config([path])
    assert path.name in str(err.value)


def test_edge_values_that_are_valid(tmp_path):
    cfg = load_config(
        [model_file(tmp_path)],
        ["model.mla.q_lora_rank=0", "model.n_dense_layers=4", "model.moe.n_expert_groups=1",
         "model.moe.n_limited_groups=1", "model.moe.n_shared_experts=0",
         "mesh.rules=[[act_batch, [data, fsdp]], [embed, fsdp], [mlp, null]]"],
    )
    assert cfg.model.n_moe_layers == 0 and cfg.model.mla.q_lora_rank == 0
    assert cfg.mesh.rules == (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))


# Missing keys
@pytest.mark.parametrize(
    "drop, pattern",
    [
        (("moe",), r"missing config keys: model\.moe$"),
        (("mla", "n_heads"), r"missing config keys: model\.mla\.n_heads$"),
        (("vocab_size",), r"missing config keys: model\.vocab_size$"),
        (("moe", "moe_inter_dim"), r"missing config keys: model\.moe\.moe_inter_dim$"),
    ],
)
def test_missing_required_keys_are_reported(tmp_path, drop, pattern):
    data = {"model": copy.deepcopy(MODEL)}
    section = data["model"]
    for key in drop[:-1]:
        section = section[key]
    del section[drop[-1]]
    with raises(pattern):
        load_config([write(tmp_path / "m.yaml", data)])


def test_all_missing_keys_are_listed(tmp_path):
    data = {"model": {k: v for k, v in MODEL.items() if k not in ("vocab_size", "dim")}}
    with raises(r"missing config keys: model\.vocab_size, model\.dim"):
        load_config([write(tmp_path / "m.yaml", data)])
    with raises(r"missing config keys: model$"):
        load_config([write(tmp_path / "empty.yaml", "")])


# Round trip
@pytest.mark.parametrize("name", ["tiny", "deepseek_v3_671b"])
def test_to_yaml_round_trips(tmp_path, name):
    cfg = load_config([CONFIGS / "model" / f"{name}.yaml"])
    path = write(tmp_path / "resolved.yaml", to_yaml(cfg))
    again = load_config([path])
    assert isinstance(again, Config)
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_round_trip_keeps_non_default_sections(tmp_path):
    overrides = [
        "mesh.shape=[1, -1, 1, 8, 1]", "mesh.rules=[[experts, expert], [embed, fsdp], [mlp, null]]",
        "optim.name=muon", "optim.lr=1.0e-3", "train.run_dir=runs/x", "data.seq_len=64",
    ]
    cfg = load_config([model_file(tmp_path)], overrides)
    again = load_config([write(tmp_path / "resolved.yaml", to_yaml(cfg))])
    assert again == cfg
    assert again.mesh.rules[0] == ("experts", "expert") and again.optim.lr == 1e-3



# Parts compose: mHC streams and hash routing with MLA; remat; the emulated ragged dispatch
def test_mla_blocks_on_mhc_streams_with_the_indexer(tmp_path):
    index = {"index_n_heads": 2, "index_head_dim": 16, "index_topk": 8}
    cfg = load_config([model_file(tmp_path, mhc={"hc_mult": 2}, index=index)])
    assert cfg.model.mhc.hc_mult == 2 and cfg.model.v4 is None and cfg.model.index.index_topk == 8
    assert not cfg.model.row_positions  # MLA honours per-document / left-padded positions


def test_v4_still_needs_mhc_and_compress_ratios_still_need_v4(tmp_path):
    with raises(r"model\.v4 needs model\.mhc"):
        load_model_config([CONFIGS / "model" / "tiny_v4.yaml"], ["model.mhc="])
    with raises(r"model\.compress_ratios \(V4 SWA/CSA/HCA per layer\) needs model\.v4"):
        load_config([model_file(tmp_path, compress_ratios=[0, 4, 0, 4])])
    with raises(r"model\.quant_sim is wired for V4 models only"):
        load_config([model_file(tmp_path, mhc={})], ["model.quant_sim=fp8"])


def test_v41_refuses_document_mask():
    """V4.1's attention gets no segment ids: a document mask it cannot honour is refused, naming the field."""
    assert not load_model_config([CONFIGS / "model" / "tiny_v41.yaml"]).v4.document_mask
    with raises(r"v4\.document_mask must be false with model\.shared_kv \(V4\.1\)"):
        load_model_config([CONFIGS / "model" / "tiny_v41.yaml"], ["model.v4.document_mask=true"])


def test_hash_routing_without_v4_is_bounded_by_the_moe_layers(tmp_path):
    path = model_file(tmp_path)  # 4 layers, 1 dense: 3 MoE layers
    assert load_config([path], ["model.moe.n_hash_layers=3"]).model.moe.n_hash_layers == 3
    with raises(r"moe\.n_hash_layers \(4\) must be <= the MoE layers \(n_layers - n_dense_layers = 3\)"):
        load_config([path], ["model.moe.n_hash_layers=4"])
    with raises(r"moe\.n_hash_layers \(2\) must be <= the MoE layers .* = 1\)"):
        load_config([path], ["model.n_dense_layers=3", "model.moe.n_hash_layers=2"])


@pytest.mark.parametrize("policy", ["none", "full", "save_dots", "save_attention", "offload"])
def test_remat_policies(tmp_path, policy):
    assert load_config([model_file(tmp_path)], [f"model.remat={policy}"]).model.remat == policy


def test_remat_default_and_unknown_policy(tmp_path):
    assert load_config([model_file(tmp_path)]).model.remat == "none"
    with raises(r"model\.remat \(from override 'model\.remat=dots'\): 'dots' is not one of \('none', 'full'"):
        load_config([model_file(tmp_path)], ["model.remat=dots"])


def test_emulated_ragged_dispatch_is_a_dispatch_value(tmp_path):
    cfg = load_config([model_file(tmp_path)], ["model.moe.dispatch=ragged_a2a_emulated"])
    assert cfg.model.moe.dispatch == "ragged_a2a_emulated"
    with raises(r"model\.moe\.dispatch .*'ragged' is not one of"):
        load_config([model_file(tmp_path)], ["model.moe.dispatch=ragged"])


def test_row_positions_marks_v4_attention():
    assert load_model_config([CONFIGS / "model" / "tiny_v4.yaml"]).row_positions
    assert not load_model_config([CONFIGS / "model" / "tiny.yaml"]).row_positions


# Cross-section checks (config/checks.py), run by the loader on every Config
def test_seq_len_longer_than_the_model_names_both_keys_and_sources(tmp_path):
    path = model_file(tmp_path, "short.yaml", max_seq_len=64)
    with raises(r"data\.seq_len=128 exceeds model\.max_seq_len=64 \(data\.seq_len from override "
                r"'data\.seq_len=128', model\.max_seq_len from .*short\.yaml\)"):
        load_config([path], ["data.seq_len=128"])
    with raises(r"data\.seq_len=256 exceeds model\.max_seq_len=64 \(data\.seq_len from the default"):
        load_config([path])
    assert load_config([path], ["data.seq_len=64"]).data.seq_len == 64  # equal is fine
    assert load_model_config([path]).max_seq_len == 64  # model only: no data section to check against


def test_media_token_ids_list_the_configured_modalities_and_feed_their_checks():
    """ModelConfig.media_token_ids: kind -> placeholder id for the configured media sections only; the
    vocabulary and distinctness checks name the config fields."""
    import dataclasses

    m = load_model_config([CONFIGS / "model" / "tiny_multimodal.yaml"])
    assert m.media_token_ids() == {"image": 61, "audio": 63, "video": 62}
    assert dataclasses.replace(m, video=None, audio=None).media_token_ids() == {"image": 61}
    assert dataclasses.replace(m, vision=None, video=None, audio=None).media_token_ids() == {}
    with raises(r"model\.audio\.audio_token_id \(999\) must be < vocab_size"):
        dataclasses.replace(m, audio=dataclasses.replace(m.audio, audio_token_id=999))
    with raises(r"media placeholder ids must differ, got \{'vision\.image_token_id': 61, 'audio\.audio_token_id': 61"):
        dataclasses.replace(m, audio=dataclasses.replace(m.audio, audio_token_id=61))


def test_mtp_and_dspark_need_a_target_inside_the_row(tmp_path):
    """Depth K of MTP predicts K + 1 tokens ahead, DSpark's last slot block_size + 1: data.seq_len must exceed it."""
    path = model_file(tmp_path, num_nextn_predict_layers=2)
    with raises(r"data\.seq_len=3 leaves no target for model\.num_nextn_predict_layers=2 .*needs data\.seq_len >= 4 "
                r"\(data\.seq_len from override 'data\.seq_len=3', "
                r"model\.num_nextn_predict_layers from .*model\.yaml\)"):
        load_config([path], ["data.seq_len=3"])
    assert load_config([path], ["data.seq_len=4"]).data.seq_len == 4
    assert load_config([model_file(tmp_path)], ["data.seq_len=2"]).data.seq_len == 2  # no MTP: a next token suffices
    v41 = CONFIGS / "model" / "tiny_v41.yaml"  # dspark.block_size 3
    with raises(r"data\.seq_len=4 leaves no target for model\.dspark\.block_size=3 .*needs data\.seq_len >= 5"):
        load_config([v41], ["data.seq_len=4"])
    assert load_config([v41], ["data.seq_len=5"]).data.seq_len == 5


def test_paths_expand_the_home_directory(tmp_path, monkeypatch):
    """`~` in config file names, includes and the path fields is the home directory, for every reader."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "inc.yaml", {"model": MODEL})
    write(tmp_path / "sub" / "top.yaml", {"include": ["~/inc.yaml"]})
    paths = ["train.run_dir=~/run", "train.init_from=~/ckpt", "data.source=~/corpus/*.txt", "data.tokenizer=~/tok.json"]
    cfg = load_config(["~/sub/top.yaml"], paths)
    assert cfg.train.run_dir == str(tmp_path / "run") and cfg.train.init_from == str(tmp_path / "ckpt")
    assert cfg.data.source == str(tmp_path / "corpus" / "*.txt") and cfg.data.tokenizer == str(tmp_path / "tok.json")
    assert load_config([model_file(tmp_path)]).data.source == "stdlib"  # names that are not paths stay
