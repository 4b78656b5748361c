"""Bad input in a config, its data or its mesh, as a user meets it through `deepseek-jax train`: one line
`error: ...` naming the field and the value, exit 2, no traceback, and nothing spent first: no step compiled,
no checkpoint, no metrics row (`train` runs in-process on the tiny test model; the first compile is trapped)."""

import re
import time

import pytest

from deepseek_jax import cli
from deepseek_jax import run as run_lib
from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.data import DataError, check_splits
from deepseek_jax.multihost import check_batch_split
from deepseek_jax.program import build_program
from deepseek_jax.sharding import abstract_mesh, check_state_split, rules
from tests.test_train import write_config
from tests.utils import CONFIGS

FSDP_EP = str(CONFIGS / "mesh" / "fsdp_ep.yaml")  # experts over `expert`, the batch over data x fsdp x expert


@pytest.fixture
def train(tmp_path, corpus, capsys, monkeypatch):
    """`train CONFIG ARGS...` in this process -> (exit code, stderr, seconds); a compile fails the test."""

    def first_compile(*_):
        raise AssertionError("reached the first compile: the bad input was not caught before")

    monkeypatch.setattr(run_lib, "restore_or_init", first_compile)

    def call(*args: str, source=corpus) -> tuple[int, str, float]:
        path = write_config(tmp_path, source)
        capsys.readouterr()
        t0 = time.perf_counter()
        rc = cli.main(["train", str(path), *args])
        seconds = time.perf_counter() - t0
        run_dir = tmp_path / "run"
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
        return rc, capsys.readouterr().err, seconds

    return call


def assert_one_line_error(rc: int, err: str, pattern: str) -> None:
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), (pattern, err)


# (override, what the one-line error must say): each fails while the config loads
CONFIG_CASES = [
    ("optim.lr=.inf", r"optim\.lr \(from override 'optim\.lr=\.inf'\): must be a finite number, got inf"),
    ("optim.lr=nan", r"optim\.lr .*must be a finite number, got nan"),
    ("optim.lr=-0.001", r"optim\.lr must be a finite number > 0, got -0\.001"),
    ("optim.b1=1.5", r"optim\.b1 must be in \[0, 1\), got 1\.5"),
    ("optim.eps=0", r"optim\.eps must be a finite number > 0, got 0\.0"),
    ("optim.weight_decay=-1", r"optim\.weight_decay must be a finite number >= 0, got -1\.0"),
    ("optim.warmup_steps=-5", r"optim\.warmup_steps must be >= 0, got -5"),
    ("train.steps=[1,", r"override 'train\.steps=\[1,': the value is not valid YAML"),
    ("optim.lr={", r"override 'optim\.lr=\{': the value is not valid YAML"),
    ("train.steps=[20]", r"train\.steps .*expected an integer, got \[20\]"),
    ("train.stop_at=50", r"train\.stop_at must be in \[0, train\.steps=20\] .*got 50"),
    ("train.mtp_loss_weight=-.inf", r"train\.mtp_loss_weight .*must be a finite number, got -inf"),
    ("train.run_dir=''", r"train\.run_dir must name a directory"),
    ("data.seq_len=1", r"data\.seq_len must be >= 2 .*got 1"),
    ("data.seq_len=2", r"data\.seq_len=2 leaves no target for model\.num_nextn_predict_layers=1 .*>= 3"),
    ("data.val_fraction=1.5", r"data\.val_fraction must be in \(0, 1\), got 1\.5"),
    ("data.source=''", r"data\.source must name the data"),
    ("model.moe.route_scale=0", r"moe\.route_scale must be > 0, got 0\.0"),
    ("mesh.shape=[1,1,1,3]", r"mesh\.shape needs 5 sizes .*got \[1, 1, 1, 3\]"),
    ("mesh.rules=[[embed]]", r"mesh\.rules entries are \[logical_name, mesh_axes\], got \('embed',\)"),
]


@pytest.mark.parametrize("override, pattern", CONFIG_CASES, ids=[o for o, _ in CONFIG_CASES])
def test_bad_config_values_fail_at_load(train, override, pattern):
    rc, err, seconds = train(override)
    assert_one_line_error(rc, err, pattern)
    assert seconds < 5, seconds


# (args, error): the mesh against the parameters and the batch it splits, checked before the first compile
MESH_CASES = [
    (["--mesh", FSDP_EP, "mesh.shape=[1,1,1,3,1]", "data.global_batch_size=6"],
     r"parameter params/.*ffn/w_\w+ dim 1 \(size 8\) does not split over mesh axes expert=3 \(3 shards\): change "
     r"mesh\.shape or mesh\.rules"),
    (["--mesh", FSDP_EP, "mesh.shape=[1,1,1,8,1]", "data.global_batch_size=8", "model.moe.n_routed_experts=4"],
     r"parameter params/.*ffn/w_\w+ dim 1 \(size 4\) does not split over mesh axes expert=8 \(8 shards\)"),
    (["--mesh", FSDP_EP, "mesh.shape=[1,1,1,3,1]"],
     r"data\.global_batch_size=4 does not split over the 3 batch shards \(mesh axes \['expert'\]: expert=3, .*"
     r"use a multiple of 3"),
    (["--mesh", FSDP_EP, "mesh.shape=[1,-1,1,3,1]"], r"mesh\.shape \[1, -1, 1, 3, 1\] does not fit 8 devices"),
]


@pytest.mark.parametrize("args, pattern", MESH_CASES, ids=["experts_3", "experts_4_over_8", "batch", "devices"])
def test_mesh_that_does_not_split_the_state_or_batch(train, args, pattern):
    rc, err, seconds = train(*args)
    assert_one_line_error(rc, err, pattern)
    assert seconds < 20, seconds


def test_single_file_corpus_fails_before_training(train, tmp_path, corpus):
    """A text file is one document: one of the two splits is empty, and that is said before any step."""
    one = tmp_path / "corpus" / "only.txt"
    one.parent.mkdir()
    one.write_text("".join(p.read_text() for p in sorted(corpus.iterdir())))
    rc, err, _ = train(source=one)
    assert_one_line_error(rc, err, r"the (train|validation) split of data\.source '.*only\.txt' is empty: none of "
                                   r"its 1 document\(s\) fall there with data\.val_fraction=0\.1; add documents .*"
                                   r"each split needs at least one")


def test_validation_split_smaller_than_the_processes(tmp_path, corpus):
    """Each process evaluates its own share of the validation documents, so it needs one per process."""
    cfg = load_config([write_config(tmp_path, corpus)])
    check_splits(cfg, 1)
    with pytest.raises(DataError, match=r"validation split of data\.source .* holds \d+ document\(s\), fewer than "
                                        r"the 1000 processes.*data\.val_fraction \(now 0\.1\)"):
        check_splits(cfg, 1000)


def test_state_split_is_checked_on_an_abstract_mesh_too(tmp_path, corpus):
    """`plan` builds its program on an abstract mesh (no devices): the same checks hold there."""
    path = write_config(tmp_path, corpus)

    def program(shape: str, batch: int, n_devices: int):
        cfg = load_config([path, FSDP_EP], [f"mesh.shape={shape}", f"data.global_batch_size={batch}"])
        return cfg, build_program(cfg, abstract_mesh(cfg.mesh, n_devices), rules(cfg.mesh))

    cfg, p = program("[1,2,1,3,1]", 6, 6)
    check_batch_split(p.batch_sharding, cfg)  # 6 rows over fsdp x expert = 6 shards
    with pytest.raises(ConfigError, match=r"parameter params/.* \(size 8\) does not split over mesh axes expert=3"):
        check_state_split(p.state_target(), p.mesh)
    cfg, p = program("[1,2,1,4,1]", 8, 8)
    check_state_split(p.state_target(), p.mesh)  # 8 experts over 4, every other dimension whole or over 2
    check_batch_split(p.batch_sharding, cfg)
    with pytest.raises(ConfigError, match=r"data\.global_batch_size=12 does not split over the 8 batch shards"):
        check_batch_split(p.batch_sharding, load_config([path, FSDP_EP], ["data.global_batch_size=12"]))
