"""A converted checkpoint in the rest of the system: restored onto any mesh file (the layout comes
from the mesh, not the converter), and the user's two commands — `convert import` then `generate
--checkpoint` — plus fine-tuning from it (`train.init_from`)."""

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from deepseek_jax.checkpoint import restore_converted
from deepseek_jax.cli import main
from deepseek_jax.config import load_config
from deepseek_jax.convert.importer import import_checkpoint
from deepseek_jax.convert.orbax_writer import restore_tree
from deepseek_jax.program import build_program
from deepseek_jax.sharding import activate, make_mesh, rules
from tests.convert.checkpoints import hf_model, torch
from tests.parity.hf_reference import build_hf_model, tiny_hf_config
from tests.utils import CONFIGS

pytestmark = pytest.mark.parity


def byte_tokenizer(path):
    """A byte-level tokenizer with no merges: 256 byte symbols and <|endoftext|> (id 256)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<|endoftext|>": 256}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))


@pytest.fixture(scope="module")
def converted_v4(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    hf_model("v4").save_pretrained(root / "hf")
    return import_checkpoint(root / "hf", root / "ours", log=lambda _: None)


def _logits(out_dir, mesh_file, tokens):
    cfg = load_config(
        [out_dir / "config.yaml", CONFIGS / "mesh" / mesh_file], ["model.dtype=float32", "data.global_batch_size=8"]
    )
    mesh, mesh_rules = make_mesh(cfg.mesh), rules(cfg.mesh)
    program = build_program(cfg, mesh, mesh_rules)
    variables = restore_converted(out_dir, program.state_target())
    leaf = max(jax.tree.leaves(variables["params"]), key=lambda a: a.size)  # the largest: experts
    with activate(mesh, mesh_rules), jax.default_matmul_precision("highest"):
        logits = jax.jit(lambda v, t: program.model.apply(v, t).logits)(variables, tokens)
    return np.asarray(logits), leaf.sharding


@pytest.mark.multidevice
def test_restores_onto_any_mesh_with_equal_logits(converted_v4):
    tokens = np.random.default_rng(0).integers(0, 96, (8, 32))
    single, _ = _logits(converted_v4, "single.yaml", tokens)
    sharded, sharding = _logits(converted_v4, "fsdp_ep.yaml", tokens)
    assert len(sharding.device_set) == 8 and not sharding.is_fully_replicated  # really split by the mesh
    np.testing.assert_allclose(sharded, single, rtol=2e-5, atol=2e-5)


def test_converted_checkpoint_refuses_another_model(converted_v4, tmp_path):
    cfg = load_config([converted_v4 / "config.yaml"], ["model.moe.moe_inter_dim=32"])
    program = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    from deepseek_jax.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"does not fit this model.*w_gate"):
        restore_converted(converted_v4, program.state_target())


@pytest.mark.slow
def test_import_then_generate_matches_transformers_greedy(tmp_path, capsys):
    """The README's two commands, on a tiny V3 with a tokenizer: the continuation is transformers'."""
    model, _ = build_hf_model(tiny_hf_config(vocab_size=300, num_mtp_layers=0))
    model.save_pretrained(tmp_path / "hf")
    byte_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert main(["convert", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    capsys.readouterr()
    args = [
        "generate",
        "--checkpoint",
        str(tmp_path / "ours"),
        "--prompt",
        "def f(x):",
        "--max-new-tokens",
        "6",
        "model.dtype=float32",
        "model.moe.impl=dense",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out.split("\n", 1)[1]
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    ids = torch.tensor([tok.encode("def f(x):").ids])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert text.rstrip("\n") == "def f(x):" + tok.decode(want[0, ids.shape[1] :].tolist())


def word_tokenizer(path, n_words: int):
    vocab = {"<|endoftext|>": 0} | {f"w{i}": i + 1 for i in range(n_words)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


@pytest.mark.slow
def test_fine_tuning_starts_from_the_converted_weights(converted_v4, tmp_path):
    """train.init_from (set in OUT/config.yaml): step 0 is the converted model with a fresh optimizer;
    with a vanishing learning rate the saved step-1 weights are the converted ones."""
    from deepseek_jax.run import load_trained

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"{i}.txt").write_text(" ".join(f"w{(i * j) % 80}" for j in range(300)))
    word_tokenizer(tmp_path / "tok.json", 80)
    overrides = [
        f"data.source={corpus}",
        f"data.tokenizer={tmp_path / 'tok.json'}",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=1",
        "optim.lr=1e-30",
        "optim.warmup_steps=0",
        "data.seq_len=32",
        "train.sample_prompts=[]",
        "train.eval_batches=1",
        "data.global_batch_size=8",
        "model.dtype=float32",
        "train.bias_update_rate=0",
    ]
    assert main(["train", str(converted_v4 / "config.yaml"), *overrides]) == 0
    cfg = load_config([converted_v4 / "config.yaml"], overrides)
    _, state = load_trained(cfg)
    assert int(state.step) == 1
    want = restore_tree(
        converted_v4 / "params",
        jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": state.params, "router": state.router}
        ),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
        {"params": state.params, "router": state.router},
        want,
    )
