"""Run schemas: the mesh and its rules, the data stream, the optimizer, the loop, and `Config`, the
whole run (model + mesh + data + optim + train) that one YAML file set resolves to."""

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from deepseek_jax.axes import LOGICAL_AXES
from deepseek_jax.config.errors import require as _check
from deepseek_jax.config.model import ModelConfig

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")
DEMO_SOURCE = "demo_media"  # data.source of the built-in demo records (data/demo_media.py)


def _expand_user(section, *names: str) -> None:
    """Expands a leading `~` in the path fields `names` of a frozen section, so every reader of the field
    (and the config saved with checkpoints) sees the same path."""
    for name in names:
        object.__setattr__(section, name, os.path.expanduser(getattr(section, name)))


def _check_ranges(section: str, obj, rules: tuple[tuple[str, object, str], ...]) -> None:
    """Table-driven range checks: (field, predicate on its value, what it must be)."""
    for name, ok, must in rules:
        value = getattr(obj, name)
        _check(ok(value), f"{section}.{name} must be {must}, got {value}")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    axes: tuple[str, ...] = MESH_AXES  # always (data, fsdp, context, expert, tensor)
    shape: tuple[int, ...] = (1, -1, 1, 1, 1)  # devices per axis; one -1 takes the rest
    rules: tuple[tuple[str, Any], ...] = ()  # ordered (logical name, mesh axis | [axes] | null)

    def __post_init__(self):
        _check(self.axes == MESH_AXES, f"mesh.axes must be {list(MESH_AXES)}, got {list(self.axes)}")
        shape = list(self.shape)
        _check(len(self.shape) == len(MESH_AXES), f"mesh.shape needs {len(MESH_AXES)} sizes {list(MESH_AXES)}, "
               f"got {shape}")
        _check(sum(s == -1 for s in self.shape) <= 1, f"mesh.shape may hold at most one -1, got {shape}")
        _check(all(s == -1 or s > 0 for s in self.shape), f"mesh.shape sizes must be > 0 or -1, got {shape}")
        for rule in self.rules:
            ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
            _check(ok, f"mesh.rules entries are [logical_name, mesh_axes], got {rule!r}")
            name, target = rule
            _check(name in LOGICAL_AXES, f"mesh.rules: unknown logical axis {name!r}")
            targets = target if isinstance(target, (list, tuple)) else [target]
            for t in targets:
                _check(t is None or (isinstance(t, str) and t in MESH_AXES),
                       f"mesh.rules[{name}]: unknown mesh axis {t!r}")


@dataclass(frozen=True, kw_only=True)
class MediaDataConfig:
    """Interleaved text + media records (data/media_records.py, data/media_pack.py, media/encode.py). Per-row
    budgets fix the media arrays' shapes, so a step compiles once; a row takes whole records while every
    budget holds. 0 = derived (`budgets`)."""

    max_patches: int = 0  # P, ViT patches per row (all pictures: images and video frames); 0 = r² · M
    max_image_rows: int = 0  # M, aligner rows (IMAGE slots) per row; 0 = seq_len - 3 (any row's maximum)
    max_audio_clips: int = 0  # A, audio clips per row; 0 = as many clips of F frames as fit a row
    max_audio_frames: int = 0  # F, log-mel frames per clip; 0 = model.audio.max_frames, cut to what fits a row
    skip_bad_records: bool = False  # a corrupt / unsupported / oversized record is a counted skip, not an error
    max_skipped_fraction: float = 0.01  # with skip_bad_records: stop once more than this share is skipped

    def __post_init__(self):
        for name in ("max_patches", "max_image_rows", "max_audio_clips", "max_audio_frames"):
            _check(getattr(self, name) >= 0, f"data.media.{name} must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.max_skipped_fraction <= 1,
               f"data.media.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")

    def budgets(self, model: ModelConfig, seq_len: int) -> dict[str, int]:
        """The per-row budgets with the zeros resolved; a modality the model lacks gets 0."""
        M = P = A = F = 0
        if model.vision is not None:
            M = self.max_image_rows or max(seq_len - 3, 1)  # a span of h·w rows takes >= h·w + 3 positions
            P = self.max_patches or model.vision.downsample_ratio**2 * M  # an aligner row covers <= r² patches
        if model.audio is not None:
            stride = math.prod(model.audio.conv_strides)  # n_tokens(F) = ceil(F / stride)
            F = self.max_audio_frames or min(model.audio.max_frames, max(seq_len - 2, 1) * stride)
            A = self.max_audio_clips or max(1, seq_len // (model.audio.n_tokens(F) + 2))
        return {"max_patches": P, "max_image_rows": M, "max_audio_clips": A, "max_audio_frames": F}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (this Python's own library sources) or files: path, dir or glob
    format: Literal["auto", "text", "jsonl", "array_record"] = "auto"  # auto: by file extension
    jsonl_field: str = "text"  # the JSONL field holding a document
    val_fraction: float = 0.05  # share of documents held out, chosen by a hash of their path / index
    tokenizer: str = ""  # a tokenizer.json; "" trains a byte-level BPE on the training split
    tokenizer_vocab_size: int = 4096  # vocabulary of the trained BPE (must be <= model.vocab_size)
    seq_len: int = 256  # T, tokens per packed sequence
    global_batch_size: int = 8  # B, sequences per step across all processes
    seed: int = 0  # shuffling seed, in [0, 2**32)
    shuffle_window: int = 1024  # packed rows shuffled together (long documents span many rows); 0 = off
    worker_count: int = 0  # Grain worker processes; 0 = in the main process
    max_documents: int = 0  # cap on documents read (0 = all), for quick runs
    # interleaved text + media records ({"segments": [...]}: media/encode.py; read by data/media_records.py,
    # packed by data/media_pack.py) with these per-row budgets; None = plain text documents.
    # source `demo_media` (DEMO_SOURCE) = the built-in demo records (data/demo_media.py)
    media: MediaDataConfig | None = None

    def __post_init__(self):
        _expand_user(self, "source", "tokenizer")
        _check(self.source != "", "data.source must name the data (stdlib, demo_media, or a file, folder or glob), "
               "got ''")
        _check_ranges("data", self, (
            ("seq_len", lambda v: v >= 2, ">= 2 (a token and the next one it predicts)"),
            ("global_batch_size", lambda v: v > 0, "> 0"),
            ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
            ("tokenizer_vocab_size", lambda v: v >= 259, ">= 259 (bytes + specials)"),
            ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
            *((name, lambda v: v >= 0, ">= 0") for name in ("shuffle_window", "worker_count", "max_documents")),
        ))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: weight matrices by Muon, the rest by AdamW
    lr: float = 3e-4  # peak learning rate (AdamW, and Muon's when muon_lr is 0)
    muon_lr: float = 0.0  # peak learning rate of the Muon group; 0 = lr (RMS-matched updates)
    warmup_steps: int = 100  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps
    weight_decay: float = 0.1  # decoupled; not on norms, biases or the input embedding
    b1: float = 0.9  # Adam β1 (Muon uses its own momentum, optim.MUON_MOMENTUM)
    b2: float = 0.95  # Adam β2
    eps: float = 1e-8  # Adam ε (also Muon's)
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables

    def __post_init__(self):  # finite: the loader rejects nan / inf, and these checks do for Python callers
        _check_ranges("optim", self, (
            ("lr", lambda v: 0 < v < math.inf, "a finite number > 0"),
            ("muon_lr", lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = optim.lr)"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("eps", lambda v: 0 < v < math.inf, "a finite number > 0"),
            ("warmup_steps", lambda v: v >= 0, ">= 0"),
            *((name, lambda v: 0 <= v < math.inf, "a finite number >= 0") for name in ("weight_decay", "clip_norm")),
        ))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps (the LR schedule's length)
    stop_at: int = 0  # end this invocation after this step (and save), schedule unchanged; 0 = steps
    seed: int = 0  # parameter-init seed
    run_dir: str = "runs/default"  # checkpoints, logs, resolved config
    # a converted checkpoint directory (`deepseek-jax convert import`) whose parameters start a new run
    # (fresh optimizer and step 0); ignored once run_dir holds a checkpoint of its own
    init_from: str = ""
    log_every: int = 10  # steps between host syncs for metrics
    eval_every: int = 200  # steps; 0 = only at the end
    eval_batches: int = 8  # validation batches per evaluation
    ckpt_every: int = 200  # steps; 0 = only at the end
    keep_checkpoints: int = 3  # most recent checkpoints kept
    async_checkpoints: bool = True  # save in the background while training continues
    mtp_loss_weight: float = 0.3  # λ of the MTP loss (V3: 0.3, later 0.1)
    # weight of the indexer KL (V3.2 DSA blocks, V4 CSA layers), summed over layers (each indexer learns
    # only from its own KL, so this scales the indexers' gradients alone); 0 = no KL computed, the indexers
    # stay frozen (V4 before issue 14); unused without an indexer
    index_loss_weight: float = 1.0
    balance_loss_weight: float = 1e-4  # α of the sequence-wise balance loss (V3: 1e-4)
    bias_update_rate: float = 1e-3  # γ of the aux-loss-free bias update (V3: 0.001); 0 = off
    # tokens per device per cross-entropy chunk (memory ~ chunk x V); 0 = auto (losses.auto_chunk_tokens: on
    # one device ~2^26 logits per chunk, e.g. 512 tokens at V3's 129,280-token vocabulary; else 4096)
    loss_chunk_tokens: int = 0
    skip_nonfinite_steps: bool = False  # skip a step whose loss/grads are NaN/Inf instead of stopping
    peak_flops: float = 0.0  # per-device FLOP/s for MFU; 0 = measure a matmul at start-up
    sample_prompts: tuple[str, ...] = ("def fibonacci(n):", "import os\n")  # completions at the end
    sample_tokens: int = 48  # tokens generated per prompt

    def __post_init__(self):
        _expand_user(self, "run_dir", "init_from")
        _check(self.run_dir != "", "train.run_dir must name a directory, got ''")
        _check_ranges("train", self, (
            ("steps", lambda v: 0 < v < 2**31, "in [1, 2**31) (the step counter is int32)"),
            ("stop_at", lambda v: 0 <= v <= self.steps, f"in [0, train.steps={self.steps}] (0 = train.steps)"),
            *((name, lambda v: v > 0, "> 0") for name in ("log_every", "keep_checkpoints", "eval_batches")),
            *((name, lambda v: v >= 0, ">= 0") for name in ("eval_every", "ckpt_every", "loss_chunk_tokens")),
            *((name, lambda v: 0 <= v < math.inf, "a finite number >= 0") for name in (
                "mtp_loss_weight", "balance_loss_weight", "bias_update_rate", "peak_flops", "index_loss_weight")),
            ("sample_tokens", lambda v: v > 0 or not self.sample_prompts,
             "> 0 with train.sample_prompts (set train.sample_prompts=[] for no samples)"),
        ))  # fmt: skip
        for i, prompt in enumerate(self.sample_prompts):
            _check(isinstance(prompt, str) and prompt != "",
                   f"train.sample_prompts[{i}] must be a non-empty string, got {prompt!r}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run. Each section checks itself; invariants across sections (data.seq_len <=
    model.max_seq_len, ...) live in config/checks.py, which the loader runs on every Config it builds."""

    model: ModelConfig  # the network (config/model.py)
    mesh: MeshConfig = field(default_factory=MeshConfig)  # device mesh and logical-axis rules
    data: DataConfig = field(default_factory=DataConfig)  # corpus, tokenizer, packing, batch
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and LR schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # loop length, intervals, loss weights
