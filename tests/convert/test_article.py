"""The article composition's checkpoint layout (convert/article.py): MLA / DSA blocks on mHC streams with
V4's MoE, V4.1's Engram / bias_vl / vision, our video and audio front-ends and V4's stream MTP.

No checkpoint of this design exists, so the round trip is the proof that the layout is complete:
- tiny_article with random fan-in-scaled weights, nonzero router biases and random tid2eid: export
  (official names) -> import gives every parameter and router array bit for bit and the same ModelConfig;
  exported names and values are spot-checked per part against the release spellings and a direct transform
  of our arrays; `--quant fp8` imports to exactly its dequantised FP8 values, within the e4m3 bound of the
  originals. The inner loop runs both directions without Orbax (the exporter reads our arrays from memory,
  the importer's lazy slices are gathered in memory: every check and transform of the real path); `slow`
  adds the whole `convert export` / `convert import` CLI through Orbax; tiny_composed (a dense layer, no
  media or Engram) round-trips too;
- the full-size article (eval_shape only): every parameter slice filled by exactly one tensor, the names
  unique and counted per part, sampled shapes from the config's own sizes;
- refusals: a missing tensor on import, `--layout hf`, unknown config.json keys, each named.
"""

import dataclasses
import functools
import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.cli import main
from deepseek_jax.config import load_model_config, to_yaml
from deepseek_jax.convert import article, exporter, importer, table
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.formats import dequant
from deepseek_jax.convert.orbax_writer import LazyArray, restore_tree, write_tree
from deepseek_jax.convert.source import family_of, open_source
from deepseek_jax.layers.engram import table_rows
from deepseek_jax.models import converter
from tests.utils import CONFIGS, assert_trees_equal, read_safetensors_dir, write_checkpoint

FAMILY = article.FAMILY
QUIET = dict(log=lambda _: None)


def _cfg(name: str):
    return load_model_config([CONFIGS / "model" / f"{name}.yaml"])


def _variables(cfg, abstract, seed: int = 0) -> dict:
    """Random variables: N(0, 1/fan-in) weights (fan-in: the second-to-last dim), N(0, 1) vectors, router
    biases N(0, 0.1) (nonzero), tid2eid uniform expert ids, Engram padding rows zero (as initialised)."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        if np.issubdtype(s.dtype, np.integer):
            return rng.integers(0, cfg.moe.n_routed_experts, s.shape).astype(np.int32)
        scale = 0.1 if path[0].key == "router" else 1 / math.sqrt(s.shape[-2]) if len(s.shape) > 1 else 1.0
        return (scale * rng.standard_normal(s.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(one, abstract)
    for j, layer in enumerate(cfg.engram.layer_ids if cfg.engram else ()):
        leaf = next(p for p, _ in table.iter_leaves(variables) if p[-1] == "table" and p[1] == f"layers_{layer}")
        table.get_leaf(variables, leaf)[:, cfg.engram.num_embeddings[j]:] = 0
    return variables


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """The model's eval_shape (seconds) once per config for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        fn = functools.cache(importer.abstract_variables)
        mp.setattr(importer, "abstract_variables", fn)
        mp.setattr(exporter, "abstract_variables", fn)
        yield fn


def _converted(tmp, cfg, variables):
    """What `convert import` writes (params/ + config.yaml), written directly from our variables."""
    ours = tmp / "ours"
    write_tree(ours / importer.PARAMS_DIR, variables)
    (ours / importer.CONFIG_FILE).write_text(to_yaml(importer.run_config(cfg, ours, None)))
    return ours


@pytest.fixture(scope="module")
def tiny(cached):
    """tiny_article: (cfg, abstract variables, random variables)."""
    cfg = _cfg("tiny_article")
    abstract = cached(cfg)
    return cfg, abstract, _variables(cfg, abstract)


def _export(tmp, cfg, variables, monkeypatch, **options):
    """`convert export` of in-memory variables: the exporter's reader returns their slices (no Orbax)."""
    read = lambda leaf, index: np.asarray(table.get_leaf(variables, leaf))[index]  # noqa: E731
    monkeypatch.setattr(exporter, "open_checkpoint", lambda ckpt: (cfg, read, tmp))
    return exporter.export_checkpoint(tmp / "ours", tmp / "out", **QUIET, **options)


def _import(directory, abstract):
    """(config, variables) by `convert import`'s read path (names, shapes, dtypes checked, dequantised,
    transformed: `lazy_tree`), every slice gathered in memory instead of written with Orbax."""
    src = open_source(directory)
    importer.check_tensors(src, abstract)

    def gather(lazy):
        out = np.zeros(lazy.shape, lazy.dtype)
        for index, produce in lazy.pieces():
            out[index] = produce()
        return out

    tree = importer.lazy_tree(src, abstract, np.float32)
    return src.cfg, jax.tree.map(gather, tree, is_leaf=lambda x: isinstance(x, LazyArray))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """tiny_article exported in official names (float32), from memory."""
    cfg, _, variables = tiny
    with pytest.MonkeyPatch.context() as mp:
        return _export(tmp_path_factory.mktemp("article"), cfg, variables, mp)


def test_composition_routes_to_the_article_family():
    for name in ("tiny_article", "tiny_composed", "deepseek_v4_article"):
        assert converter(_cfg(name)) is FAMILY
    assert family_of({"model_type": "deepseek_v4_article"}) is FAMILY


def test_tiny_round_trip_is_bit_exact(tiny, exported):
    cfg, abstract, variables = tiny
    back_cfg, back = _import(exported, abstract)
    assert_trees_equal(back, variables)
    assert back_cfg == cfg  # dtype, moe.impl, video and audio included
    assert json.loads((exported / "config.json").read_text())["model_type"] == "deepseek_v4_article"


@pytest.mark.slow  # ~20 s: Orbax writes every slice (params/) in both directions
def test_tiny_round_trip_through_the_cli(tiny, tmp_path):
    """`deepseek-jax convert export` (default layout: official) then `convert import`, through Orbax files."""
    cfg, abstract, variables = tiny
    ours = _converted(tmp_path, cfg, variables)
    assert main(["convert", "export", str(ours), str(tmp_path / "official")]) == 0
    assert main(["convert", "import", str(tmp_path / "official"), str(tmp_path / "back")]) == 0
    assert_trees_equal(restore_tree(tmp_path / "back" / importer.PARAMS_DIR, abstract), variables)
    assert load_model_config([tmp_path / "back" / importer.CONFIG_FILE]) == cfg
    info = json.loads((tmp_path / "back" / importer.INFO_FILE).read_text())
    assert (info["family"], info["layout"], info["model_type"]) == (FAMILY.name, "official", article.MODEL_TYPE)


# one official spelling per part (layer 0: hash-routed MoE; 1 and 3: Engram; 1-3 learned routing)
SPELLINGS = {
    "attention": ["layers.0.attn.wq_a.weight", "layers.2.attn.wkv_b.weight", "layers.0.attn_norm.weight"],
    "indexer": ["layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.k_norm.bias"],
    "mHC": ["layers.2.hc_attn_fn", "layers.2.hc_ffn_scale"],
    "hc_head": ["hc_head_fn", "hc_head_base"],
    "gate bias": ["layers.1.ffn.gate.bias"],
    "bias_vl": ["layers.3.ffn.gate.bias_vl"],
    "tid2eid": ["layers.0.ffn.gate.tid2eid"],
    "experts": ["layers.0.ffn.experts.31.w2.weight", "layers.2.ffn.gate.weight"],
    "shared experts": ["layers.3.ffn.shared_experts.w1.weight"],
    "Engram": ["layers.1.engram.embed.weight", "layers.3.engram.wkv.weight", "layers.3.engram.q_weight"],
    "vision": ["vision.blocks.1.attn.wqkv.weight", "aligner.w1.weight", "image_newline"],
    "video (ours)": ["video_frame", "video_start"],
    "audio (ours)": ["audio.conv.1.weight", "audio.aligner.w2.bias", "audio_end"],
    "MTP": ["mtp.0.e_proj.weight", "mtp.0.hc_head_fn", "mtp.0.attn.indexer.wk.weight", "mtp.0.ffn.gate.bias_vl"],
    "globals": ["embed.weight", "norm.weight", "head.weight"],
}
ABSENT = ["layers.0.ffn.gate.bias", "layers.1.ffn.gate.tid2eid", "layers.0.ffn.gate.bias_vl",
          "layers.0.engram.wkv.weight", "layers.0.attn.wq.weight", "mtp.0.embed.weight", "model.embed_tokens.weight"]


def test_tiny_export_names_and_values(tiny, exported):
    """The release spellings per part, and values as a direct transform of our arrays."""
    cfg, _, variables = tiny
    got = read_safetensors_dir(exported)
    for part, names in SPELLINGS.items():
        assert all(n in got for n in names), (part, [n for n in names if n not in got])
    assert not set(ABSENT) & set(got)
    p, r = variables["params"], variables["router"]
    b0, b3 = p["layers_0"]["block_0"], p["layers_3"]["block_0"]
    D, I, E = cfg.dim, cfg.mhc.hc_mult, cfg.moe.n_routed_experts
    np.testing.assert_array_equal(got["layers.0.attn.wq_a.weight"], b0["attn"]["w_dq"][0].T)
    fn = p["layers_2"]["block_0"]["attn_hc"]["fn"][0]  # ours [I, D, Z], the release's [Z, I·D]
    np.testing.assert_array_equal(got["layers.2.hc_attn_fn"], fn.reshape(I * D, -1).T)
    np.testing.assert_array_equal(got["layers.0.ffn.experts.31.w2.weight"], b0["ffn"]["w_down"][0, 31].T)
    np.testing.assert_array_equal(got["layers.3.ffn.gate.bias_vl"], r["layers_3"]["block_0"]["ffn"]["bias_vl"][0])
    np.testing.assert_array_equal(got["mtp.0.ffn.gate.bias"], r["mtp_0"]["block"]["ffn"]["bias"])
    tid2eid = got["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.dtype == np.int64 and tid2eid.shape == (cfg.vocab_size, cfg.moe.n_activated_experts)
    assert 0 <= tid2eid.min() and tid2eid.max() < E
    np.testing.assert_array_equal(tid2eid, r["layers_0"]["block_0"]["ffn"]["tid2eid"][0])
    rows = cfg.engram.num_embeddings[1]  # the table's real rows only; ours adds zero rows up to table_rows
    np.testing.assert_array_equal(got["layers.3.engram.embed.weight"], b3["engram"]["table"][0, :rows])
    conv = p["media"]["audio"]["w_conv1"]  # ours [3, I, C], torch Conv1d's [C, I, 3]
    np.testing.assert_array_equal(got["audio.conv.1.weight"], conv.transpose(2, 1, 0))
    np.testing.assert_array_equal(got["video_frame"], p["media"]["video_frame"])
    assert got["layers.1.hc_ffn_base"].dtype == np.float32 and got["layers.1.ffn.gate.bias"].dtype == np.float32


def test_tiny_fp8_export_imports_its_own_values(tiny, tmp_path, monkeypatch):
    """`--quant fp8`: the release-FP8 weights as e4m3 + E8M0 128×128 `.scale` (not vision, audio, tables,
    routers); import gives exactly their dequantised values, within the e4m3 bound
    |w − deq| <= 2^-4·|w| + 2^-9·s of the originals (3 mantissa bits, RNE; the subnormal step is 2^-9 of the
    rounding scale, which is s or, in a block stored halved, 2·s: formats.py `_canonical_pow2`); the rest
    bit for bit; the config equal."""
    cfg, abstract, variables = tiny
    fp8 = _export(tmp_path, cfg, variables, monkeypatch, quant="fp8")
    stored = read_safetensors_dir(fp8)
    quantised = sorted(n.removesuffix(".scale") + ".weight" for n in stored if n.endswith(".scale"))
    for n in ("layers.0.attn.wq_a.weight", "layers.1.attn.indexer.wq_b.weight", "layers.2.ffn.experts.0.w1.weight",
              "layers.3.engram.wkv.weight", "mtp.0.e_proj.weight", "layers.1.ffn.shared_experts.w2.weight"):
        assert n in quantised and stored[n].dtype == ml_dtypes.float8_e4m3fn, n
    assert not [n for n in quantised if n.startswith(("vision.", "aligner.", "audio.")) or "engram.embed" in n
                or ".gate." in n or n in ("embed.weight", "head.weight")]
    scale = stored["layers.0.attn.wq_b.scale"]
    assert scale.dtype == ml_dtypes.float8_e8m0fnu and scale.shape == tuple(-(-n // 128) for n in stored[
        "layers.0.attn.wq_b.weight"].shape)
    back_cfg, back = _import(fp8, abstract)
    assert back_cfg == cfg
    got = table.from_variables(back, FAMILY, cfg, "official")
    want = table.from_variables(variables, FAMILY, cfg, "official")
    for n, w in want.items():
        if n not in quantised:
            np.testing.assert_array_equal(got[n], w, n)
            continue
        s_name = n.removesuffix(".weight") + ".scale"
        np.testing.assert_array_equal(got[n], dequant(n, stored[n], stored[s_name]), n)
        s = np.repeat(np.repeat(stored[s_name].astype(np.float32), 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        assert (np.abs(got[n] - w) <= 2.0**-4 * np.abs(w) + 2.0**-9 * s).all(), n


def test_tiny_composed_round_trip(cached, tmp_path, monkeypatch):
    """A dense first layer (V3's `ffn.w{1,2,3}`), no media, no Engram, no bias_vl: bit exact both ways."""
    cfg = _cfg("tiny_composed")
    abstract = cached(cfg)
    variables = _variables(cfg, abstract, seed=1)
    exported = _export(tmp_path, cfg, variables, monkeypatch)
    got = read_safetensors_dir(exported)
    assert {"layers.0.ffn.w1.weight", "layers.1.ffn.gate.tid2eid", "layers.2.ffn.gate.bias"} <= set(got)
    assert not [n for n in got if "bias_vl" in n or "engram" in n or n.startswith(("vision.", "audio"))]
    assert sum(a.size for a in got.values()) == sum(np.size(a) for a in jax.tree.leaves(variables))
    back_cfg, back = _import(exported, abstract)
    assert_trees_equal(back, variables)
    assert back_cfg == cfg


def test_missing_tensor_and_unknown_config_keys_are_named(exported, tmp_path):
    tensors = read_safetensors_dir(exported)
    config = json.loads((exported / "config.json").read_text())
    missing = {n: a for n, a in tensors.items() if n != "layers.2.attn.indexer.wk.weight"}
    src = write_checkpoint(tmp_path / "missing", missing, config, 2_000_000)
    with pytest.raises(ConversionError, match=r"missing \['layers\.2\.attn\.indexer\.wk\.weight'\]"):
        importer.import_checkpoint(src, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    no_mtp = write_checkpoint(tmp_path / "no_mtp", {n: a for n, a in tensors.items() if not n.startswith("mtp.")},
                              config, 2_000_000)  # (MTP absent: converted without it, said once)
    src = open_source(no_mtp)
    assert src.cfg.num_nextn_predict_layers == 0 and any("no MTP tensors" in n for n in src.notes)
    with pytest.raises(ConversionError, match=r"fields \['hc_post_mult'\] are not implemented"):
        article.config_from_json({**config, "hc_post_mult": 2.0})
    with pytest.raises(ConversionError, match=r"deepseek_jax: unknown config key 'model.moe.bias_scale'"):
        article.config_from_json({**config, "deepseek_jax": {"moe": {"bias_scale": 1.0}}})
    with pytest.raises(ConversionError, match=r"missing \['hc_mult'\]"):
        article.config_from_json({k: v for k, v in config.items() if k != "hc_mult"})


def test_hf_layout_is_refused_saying_why(tiny, tmp_path):
    cfg, _, _ = tiny
    ours = tmp_path / "ours"  # a converted checkpoint's directory: refused before any array is read
    (ours / importer.PARAMS_DIR).mkdir(parents=True)
    (ours / importer.CONFIG_FILE).write_text(to_yaml(importer.run_config(cfg, ours, None)))
    with pytest.raises(ConversionError, match="--layout 'hf': .*transformers has no class for MLA / DSA blocks"):
        exporter.export_checkpoint(ours, tmp_path / "hf", layout="hf", **QUIET)
    with pytest.raises(ConversionError, match="--quant release: .* has no release-format export"):
        exporter.export_checkpoint(ours, tmp_path / "rel", quant="release", **QUIET)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "rel").exists()


def test_full_size_config_json_round_trips():
    """The release keys carry what they can; the `deepseek_jax` section only the rest (never a key's field)."""
    cfg = _cfg("deepseek_v4_article")
    hf = json.loads(json.dumps(article.config_to_json(cfg)))
    assert article.config_from_json(hf) == cfg
    assert (hf["q_lora_rank"], hf["index_topk"], hf["hc_mult"], hf["num_hash_layers"], hf["n_routed_experts"]) == (
        1536, 2048, 4, 3, 576)
    assert hf["engram_layer_ids"] == [1, 20] and hf["vision_config"]["num_hidden_layers"] == 32
    assert hf["rope_parameters"]["factor"] == 16.0 and hf["image_token_id"] == 129264
    section = hf["deepseek_jax"]
    assert {"video", "audio"} <= set(section) and section["moe"] == {"weight_before_down": True, "vl_bias": True}
    assert not {"vocab_size", "dim", "engram", "vision", "rope", "index", "mhc"} & set(section)
    no_mtp = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    assert article.config_from_json(hf, num_nextn_predict_layers=0) == no_mtp


# ----------------------------------------------------------------------------------------------
# Full size: eval_shape only
# ----------------------------------------------------------------------------------------------


def test_full_size_covers_every_parameter_once():  # 4-8 s on 2 shared cores: the 1T model's eval_shape, 109K entries
    cfg = _cfg("deepseek_v4_article")
    abstract = importer.abstract_variables(cfg)
    ents = table.entries(FAMILY, cfg)
    names = [e.name("official") for e in ents]
    assert len(set(names)) == len(names)
    shapes = dict(zip(names, (importer.expected_shape(e, abstract, cfg) for e in ents)))
    for leaf, pieces in table.leaf_pieces(ents).items():  # every slice of every leaf exactly once
        struct = table.get_leaf(abstract, leaf)
        lead = struct.shape[: len(pieces[0][0])]
        assert sorted(idx for idx, _, _ in pieces) == sorted(np.ndindex(*lead)), leaf
    assert set(table.leaf_pieces(ents)) == {p for p, _ in table.iter_leaves(abstract)}
    # element counts: ours less the Engram tables' zero padding rows
    e, H = cfg.engram, cfg.engram.head_dim
    padding = sum(table_rows(n) - n for n in e.num_embeddings) * H
    ours = sum(math.prod(s.shape) for _, s in table.iter_leaves(abstract))
    assert sum(math.prod(s) for s in shapes.values()) == ours - padding
    # tensors per part, from the config's own counts
    L, E, M, mo = cfg.n_layers, cfg.moe.n_routed_experts, cfg.num_nextn_predict_layers, cfg.moe
    block = 9 + 5 + 6 + 1 + 1 + 3 * E + 3  # MLA + norms, indexer, mHC, gate, bias | tid2eid, experts, shared
    vision = 3 + 8 * cfg.vision.num_layers + 4 + 3
    audio = 2 * len(cfg.audio.conv_strides) + 4 + 2
    mtp = block + 1 + 3 + 2 + 3  # + bias_vl, hc_head, e_proj / h_proj, enorm / hnorm / norm
    want = L * block + (L - mo.n_hash_layers) + 4 * len(e.layer_ids) + M * mtp + vision + 3 + audio + 6
    assert len(names) == want == 109_046  # (docs/checkpoints.md quotes it)
    D, m, ix, v = cfg.dim, cfg.mla, cfg.index, cfg.vision
    for name, shape in {
        "layers.0.attn.wq_b.weight": (m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), m.q_lora_rank),
        "layers.60.attn.wkv_b.weight": (m.n_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        "layers.7.attn.indexer.wq_b.weight": (ix.index_n_heads * ix.index_head_dim, m.q_lora_rank),
        "layers.0.ffn.gate.tid2eid": (cfg.vocab_size, mo.n_activated_experts),
        "layers.3.ffn.experts.575.w1.weight": (mo.moe_inter_dim, D),
        "layers.20.engram.embed.weight": (e.num_embeddings[1], H),
        "layers.1.engram.wkv.weight": ((cfg.mhc.hc_mult + 1) * D, (e.max_ngram_size - 1) * e.n_heads * H),
        "layers.5.hc_attn_fn": ((2 + cfg.mhc.hc_mult) * cfg.mhc.hc_mult, cfg.mhc.hc_mult * D),
        "hc_head_fn": (cfg.mhc.hc_mult, cfg.mhc.hc_mult * D),
        "vision.blocks.31.attn.wqkv.weight": (3 * v.hidden_size, v.hidden_size),
        "audio.conv.0.weight": (cfg.audio.conv_channels, cfg.audio.n_mels, 3),
        "video_frame": (cfg.video.max_frames, D),
        "mtp.0.e_proj.weight": (D, D), "mtp.0.ffn.gate.bias_vl": (E,), "head.weight": (cfg.vocab_size, D),
    }.items():
        assert shapes[name] == shape, (name, shapes[name], shape)
