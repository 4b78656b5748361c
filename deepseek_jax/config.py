"""Typed, frozen configs and the strict YAML loader.

Field names copy DeepSeek's own `ModelArgs` (`dim`, `n_routed_experts`, `qk_rope_head_dim`, ...) so an
upstream config diffs against ours; `convert/hf.py` maps HF `config.json` names onto them.

A YAML file may hold any of the sections `model`, `mesh`, `data`, `optim`, `train` and an
`include:` list of files (relative to it) merged first, left to right. `a.b=value` overrides come
last. Unknown keys are errors that name the key, the file it came from and the nearest valid keys.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deepseek_jax.axes import LOGICAL_AXES


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    rope_theta: float = 10000.0  # base of the RoPE frequencies
    rope_factor: float = 1.0  # YaRN context-extension factor s; 1 turns YaRN off
    original_seq_len: int = 4096  # tokens, the pre-extension context YaRN's ramp is measured on
    beta_fast: float = 32.0  # rotations: dims rotating faster than this are kept (extrapolated)
    beta_slow: float = 1.0  # rotations: dims rotating slower than this are fully interpolated
    mscale: float = 1.0  # YaRN attention-temperature coefficient on the rotated dims
    mscale_all_dim: float = 1.0  # same, for the softmax scale of all dims (HF `mscale_all_dim`); 0 = off

    def __post_init__(self):
        _check(self.rope_theta > 0, f"rope.rope_theta must be > 0, got {self.rope_theta}")
        _check(self.rope_factor >= 1, f"rope.rope_factor must be >= 1, got {self.rope_factor}")
        _check(self.original_seq_len > 0, "rope.original_seq_len must be > 0")
        _check(
            self.beta_fast > self.beta_slow > 0,
            f"rope needs beta_fast > beta_slow > 0, got {self.beta_fast}, {self.beta_slow}",
        )
        _check(self.mscale >= 0 and self.mscale_all_dim >= 0, "rope.mscale/mscale_all_dim must be >= 0")

    @property
    def yarn(self) -> bool:
        return self.rope_factor > 1


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    n_heads: int  # N
    q_lora_rank: int  # Q; 0 means a plain (full-rank) query projection
    kv_lora_rank: int  # C
    qk_nope_head_dim: int  # H
    qk_rope_head_dim: int  # R, rotated dims per head (and of the shared rope key)
    v_head_dim: int  # O

    def __post_init__(self):
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check(getattr(self, name) > 0, f"mla.{name} must be > 0, got {getattr(self, name)}")
        _check(self.q_lora_rank >= 0, f"mla.q_lora_rank must be >= 0, got {self.q_lora_rank}")
        _check(
            self.qk_rope_head_dim % 2 == 0,
            f"mla.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
        )

    @property
    def qk_head_dim(self) -> int:  # H + R
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True)
class V4AttentionConfig:
    """DeepSeek-V4 shared-KV attention (layers/v4_attention.py). The per-layer compress ratio (0 =
    sliding window only, 4 = CSA with the indexer, other = HCA) is the model's `compress_ratios`."""

    n_heads: int  # N (V4-Flash: 64)
    head_dim: int  # X, dims of each query head and of the one shared K=V head (512)
    rope_head_dim: int  # R, the last R dims of q, kv and indexer q/k are rotated (64)
    q_lora_rank: int  # Q, query latent (1024)
    o_groups: int  # groups of heads in the grouped output projection; divides n_heads (8)
    o_lora_rank: int  # per-group rank of the output projection (1024)
    window_size: int  # sliding-window keys per query, itself included (128)
    index_n_heads: int  # P, lightning-indexer heads (64)
    index_head_dim: int  # Y, indexer head dim and indexer-compressor entry width (128)
    index_topk: int  # compressed entries each CSA query attends to (Flash 512, Pro 1024)
    compress_rope_theta: float = 160000.0  # RoPE base of the CSA/HCA layers (with YaRN)
    q_block: int = 0  # queries per block of indexer top-k + attention (memory only); 0 = one block

    def __post_init__(self):
        sizes = ("n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                 "window_size", "index_n_heads", "index_head_dim", "index_topk")  # fmt: skip
        for name in sizes:
            value = getattr(self, name)
            _check(value > 0, f"v4.{name} must be > 0, got {value}")
        R, X = self.rope_head_dim, self.head_dim
        _check(R % 2 == 0, f"v4.rope_head_dim must be even (RoPE rotates pairs), got {R}")
        _check(R <= X, f"v4.rope_head_dim ({R}) must be <= head_dim ({X})")
        _check(
            R <= self.index_head_dim,
            f"v4.index_head_dim ({self.index_head_dim}) must be >= rope_head_dim ({R})",
        )
        _check(
            self.n_heads % self.o_groups == 0,
            f"v4.o_groups ({self.o_groups}) must divide n_heads ({self.n_heads})",
        )
        _check(self.compress_rope_theta > 0, "v4.compress_rope_theta must be > 0")
        _check(self.q_block >= 0, f"v4.q_block must be >= 0, got {self.q_block}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    n_routed_experts: int  # E
    n_shared_experts: int = 1  # shared experts, fused into one MLP of width n_shared * moe_inter_dim
    n_activated_experts: int  # A, routed experts per token
    n_expert_groups: int = 1  # P, groups for device-limited routing (HF `n_group`)
    n_limited_groups: int = 1  # groups a token may route into (HF `topk_group`)
    score_func: Literal["sigmoid", "softmax", "sqrtsoftplus"] = "sigmoid"  # router affinity (V4: sqrtsoftplus)
    route_scale: float = 1.0  # multiplies the routing weights (HF `routed_scaling_factor`)
    norm_topk_prob: bool = True  # renormalise the selected weights to sum to 1
    moe_inter_dim: int  # F of each routed expert
    impl: Literal["ragged", "blocked", "dense"] = "ragged"  # ragged_dot | padded blocks (CPU) | all experts
    # expert-parallel dispatch over the mesh axis the rules give `experts` (layers/moe/dispatch.py):
    dispatch: Literal["ring", "a2a", "ragged_a2a", "dense"] = "ring"
    capacity_factor: float = 0.0  # a2a / dense buffers, x the balanced load; 0 = dropless (worst case)
    swiglu_limit: float = 0.0  # clamp of routed and shared SwiGLUs: gate <= lim, |up| <= lim (V4: 10); 0 = off
    weight_before_down: bool = False  # routing weight scales silu(gate)*up before w_down (V4), not after (V3)
    n_hash_layers: int = 0  # the first MoE layers route by token id through a fixed table `tid2eid` (V4: 3)

    def __post_init__(self):
        E, A, P = self.n_routed_experts, self.n_activated_experts, self.n_expert_groups
        _check(E > 0 and A > 0, "moe needs n_routed_experts > 0 and n_activated_experts > 0")
        _check(A <= E, f"moe.n_activated_experts ({A}) must be <= n_routed_experts ({E})")
        _check(P > 0 and E % P == 0, f"moe.n_routed_experts ({E}) must be divisible by n_expert_groups ({P})")
        _check(
            0 < self.n_limited_groups <= P,
            f"moe.n_limited_groups ({self.n_limited_groups}) must be in [1, n_expert_groups={P}]",
        )
        _check(
            P == 1 or E // P >= 2,
            f"moe: group scores sum each group's top-2, so groups need >= 2 experts (E/P = {E // P})",
        )
        _check(
            A <= self.n_limited_groups * (E // P),
            f"moe.n_activated_experts ({A}) exceeds the experts in the kept groups "
            f"({self.n_limited_groups} x {E // P})",
        )
        _check(self.n_shared_experts >= 0, "moe.n_shared_experts must be >= 0")
        _check(self.moe_inter_dim > 0, "moe.moe_inter_dim must be > 0")
        _check(self.capacity_factor >= 0, f"moe.capacity_factor must be >= 0, got {self.capacity_factor}")
        _check(self.swiglu_limit >= 0, f"moe.swiglu_limit must be >= 0 (0 = off), got {self.swiglu_limit}")
        _check(self.n_hash_layers >= 0, f"moe.n_hash_layers must be >= 0, got {self.n_hash_layers}")


@dataclass(frozen=True, kw_only=True)
class MHCConfig:
    """Manifold-constrained hyper-connections (V4 §2.2, layers/mhc.py): I parallel residual streams."""

    hc_mult: int = 4  # I, residual streams (V4: 4)
    hc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp row/column rounds projecting comb (V4: 20)
    hc_eps: float = 1e-6  # added to pre, to the softmax and to every Sinkhorn denominator (V4: 1e-6)

    def __post_init__(self):
        _check(self.hc_mult >= 1, f"mhc.hc_mult must be >= 1, got {self.hc_mult}")
        _check(self.hc_sinkhorn_iters >= 1, f"mhc.hc_sinkhorn_iters must be >= 1, got {self.hc_sinkhorn_iters}")
        _check(self.hc_eps >= 0, f"mhc.hc_eps must be >= 0, got {self.hc_eps}")


@dataclass(frozen=True, kw_only=True)
class IndexerConfig:
    """DeepSeek-V3.2 sparse attention (layers/dsa.py): the lightning indexer and its top-k."""

    index_n_heads: int  # P, indexer heads (V3.2: 64)
    index_head_dim: int  # Y, dims per indexer head; the first R are rotated (V3.2: 128)
    index_topk: int  # keys (tokens) each query attends to; U = min(index_topk, S) (V3.2: 2048)
    # training stage: True = dense warm-up (dense attention, KL over all visible keys, only the
    # indexer trained); False = sparse stage (top-k attention, KL over the selected keys, all trained)
    index_dense_warmup: bool = False
    index_q_block: int = 0  # queries per block of scores + attention (memory only); 0 = one block

    def __post_init__(self):
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            _check(getattr(self, name) > 0, f"index.{name} must be > 0, got {getattr(self, name)}")
        _check(self.index_q_block >= 0, f"index.index_q_block must be >= 0, got {self.index_q_block}")
        _check(self.index_head_dim % 2 == 0, f"index.index_head_dim must be even, got {self.index_head_dim}")

    def check_against(self, q_lora_rank: int, qk_rope_head_dim: int) -> None:
        """Cross-config invariants, checked by ModelConfig.__post_init__."""
        _check(q_lora_rank > 0, "DSA needs mla.q_lora_rank > 0: the indexer reads the query latent")
        _check(
            0 < qk_rope_head_dim <= self.index_head_dim,
            f"index.index_head_dim ({self.index_head_dim}) must be >= mla.qk_rope_head_dim "
            f"({qk_rope_head_dim}): RoPE goes on the first R indexer dims",
        )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int  # V
    dim: int  # D
    inter_dim: int  # F of the dense MLP layers
    n_layers: int  # L, main-model blocks (HF `num_hidden_layers`)
    n_dense_layers: int  # leading blocks with a dense MLP (HF `first_k_dense_replace`)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    max_seq_len: int = 4096  # tokens, longest sequence the model is asked to handle
    num_nextn_predict_layers: int = 0  # MTP depth; 0 disables MTP
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype (params stay float32)
    mla: MLAConfig | None = None  # V3 / V3.2 attention (exactly one of mla and v4)
    moe: MoEConfig
    rope: RopeConfig = field(default_factory=RopeConfig)  # V4: rope_theta of SWA layers, YaRN of CSA/HCA
    index: IndexerConfig | None = None  # V3.2 DSA in every block (MTP included); None = dense MLA
    v4: V4AttentionConfig | None = None  # V4 shared-KV attention (SWA / CSA / HCA by compress_ratios)
    compress_ratios: tuple[int, ...] = ()  # V4: per layer, then per MTP layer; 0 SWA, 4 CSA, else HCA
    mhc: MHCConfig | None = None  # V4 hyper-connection streams (required with v4)
    # FP8/FP4 fake-quant of the released numerics (quant.py, README); "none" = exact float math
    quant_sim: Literal["none", "fp8", "fp8_fp4"] = "none"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "inter_dim", "n_layers", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        _check(
            0 <= self.n_dense_layers <= self.n_layers,
            f"model.n_dense_layers ({self.n_dense_layers}) must be in [0, n_layers={self.n_layers}]",
        )
        _check(self.num_nextn_predict_layers >= 0, "model.num_nextn_predict_layers must be >= 0")
        _check(self.norm_eps > 0, "model.norm_eps must be > 0")
        _check(
            (self.mla is None) != (self.v4 is None),
            "model needs exactly one attention section: mla (V3 / V3.2) or v4",
        )
        if self.index is not None:
            _check(self.mla is not None, "model.index (V3.2 DSA) needs model.mla")
            self.index.check_against(self.mla.q_lora_rank, self.mla.qk_rope_head_dim)
        if self.v4 is not None:
            self._check_v4()
        else:
            _check(not self.compress_ratios and self.mhc is None, "model.compress_ratios/mhc need model.v4")
            _check(self.moe.n_hash_layers == 0, "moe.n_hash_layers (hash routing) needs model.v4")
            _check(self.quant_sim == "none", "model.quant_sim is wired for V4 models only (model.v4)")

    def _check_v4(self):
        n = self.n_layers + self.num_nextn_predict_layers
        _check(
            len(self.compress_ratios) == n,
            f"model.compress_ratios needs {n} entries (n_layers + num_nextn_predict_layers), "
            f"got {len(self.compress_ratios)}",
        )
        _check(all(r >= 0 for r in self.compress_ratios), "model.compress_ratios must be >= 0")
        _check(self.mhc is not None, "model.v4 needs model.mhc (V4 blocks run on hyper-connection streams)")
        _check(self.n_dense_layers == 0, "model.v4: every V4 block is MoE, set n_dense_layers: 0")
        _check(
            self.moe.n_hash_layers <= self.n_layers,
            f"moe.n_hash_layers ({self.moe.n_hash_layers}) must be <= n_layers ({self.n_layers})",
        )

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    axes: tuple[str, ...] = MESH_AXES  # always (data, fsdp, context, expert, tensor)
    shape: tuple[int, ...] = (1, -1, 1, 1, 1)  # devices per axis; one -1 takes the rest
    rules: tuple[tuple[str, Any], ...] = ()  # ordered (logical name, mesh axis | [axes] | null)

    def __post_init__(self):
        _check(self.axes == MESH_AXES, f"mesh.axes must be {list(MESH_AXES)}, got {list(self.axes)}")
        _check(len(self.shape) == len(MESH_AXES), f"mesh.shape needs {len(MESH_AXES)} sizes")
        _check(sum(s == -1 for s in self.shape) <= 1, "mesh.shape may hold at most one -1")
        _check(all(s == -1 or s > 0 for s in self.shape), "mesh.shape sizes must be > 0 or -1")
        for rule in self.rules:
            _check(len(rule) == 2, f"mesh.rules entries are [logical_name, mesh_axes], got {rule}")
            name, target = rule
            _check(name in LOGICAL_AXES, f"mesh.rules: unknown logical axis {name!r}")
            targets = target if isinstance(target, (list, tuple)) else [target]
            for t in targets:
                _check(t is None or t in MESH_AXES, f"mesh.rules[{name}]: unknown mesh axis {t!r}")


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

    def __post_init__(self):
        _check(self.seq_len > 0 and self.global_batch_size > 0, "data sizes must be > 0")
        _check(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.tokenizer_vocab_size >= 259, "data.tokenizer_vocab_size must be >= 259 (bytes + specials)")
        _check(self.worker_count >= 0 and self.max_documents >= 0, "data counts must be >= 0")
        _check(0 <= self.seed < 2**32 and self.shuffle_window >= 0, "data.seed must be in [0, 2**32)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: weight matrices by Muon, the rest by AdamW
    lr: float = 3e-4  # peak learning rate (AdamW, and Muon's when muon_lr is 0)
    muon_lr: float = 0.0  # peak learning rate of the Muon group; 0 = lr (RMS-matched updates)
    warmup_steps: int = 100  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps
    weight_decay: float = 0.1  # decoupled; not on norms, biases or the input embedding
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.muon_lr >= 0, f"optim.muon_lr must be >= 0, got {self.muon_lr}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
        _check(self.warmup_steps >= 0 and self.clip_norm >= 0, "optim warmup/clip must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps (the LR schedule's length)
    stop_at: int = 0  # end this invocation after this step (and save), schedule unchanged; 0 = steps
    seed: int = 0  # parameter-init seed
    run_dir: str = "runs/default"  # checkpoints, logs, resolved config
    log_every: int = 10  # steps between host syncs for metrics
    eval_every: int = 200  # steps; 0 = only at the end
    eval_batches: int = 8  # validation batches per evaluation
    ckpt_every: int = 200  # steps; 0 = only at the end
    keep_checkpoints: int = 3  # most recent checkpoints kept
    async_checkpoints: bool = True  # save in the background while training continues
    mtp_loss_weight: float = 0.3  # λ of the MTP loss (V3: 0.3, later 0.1)
    # weight of the V3.2 indexer KL, summed over layers (each indexer learns only from its own KL,
    # so this scales the indexers' gradients alone); unused without model.index
    index_loss_weight: float = 1.0
    balance_loss_weight: float = 1e-4  # α of the sequence-wise balance loss (V3: 1e-4)
    bias_update_rate: float = 1e-3  # γ of the aux-loss-free bias update (V3: 0.001); 0 = off
    loss_chunk_tokens: int = 4096  # tokens per device per cross-entropy chunk (memory ~ chunk x V)
    skip_nonfinite_steps: bool = False  # skip a step whose loss/grads are NaN/Inf instead of stopping
    peak_flops: float = 0.0  # per-device FLOP/s for MFU; 0 = measure a matmul at start-up
    sample_prompts: tuple[str, ...] = ("def fibonacci(n):", "import os\n")  # completions at the end
    sample_tokens: int = 48  # tokens generated per prompt

    def __post_init__(self):
        _check(self.steps > 0, f"train.steps must be > 0, got {self.steps}")
        _check(self.stop_at >= 0, f"train.stop_at must be >= 0, got {self.stop_at}")
        _check(self.log_every > 0, "train.log_every must be > 0")
        _check(self.eval_every >= 0 and self.ckpt_every >= 0, "train intervals must be >= 0")
        _check(self.keep_checkpoints > 0 and self.eval_batches > 0, "train counts must be > 0")
        _check(self.loss_chunk_tokens > 0, "train.loss_chunk_tokens must be > 0")
        for name in ("mtp_loss_weight", "balance_loss_weight", "bias_update_rate", "peak_flops", "index_loss_weight"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Loading


def _merge(base: dict, new: dict, origin: dict, src: str, prefix: str = "") -> dict:
    """Deep-merges `new` over `base`, recording which source set each leaf."""
    out = dict(base)
    for key, value in new.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, src, path + ".")
        else:
            out[key] = value
            origin[path] = src
            if isinstance(value, dict):
                for sub in _leaf_paths(value, path + "."):
                    origin[sub] = src
    return out


def _leaf_paths(d: dict, prefix: str) -> list[str]:
    paths = []
    for k, v in d.items():
        paths.append(prefix + k)
        if isinstance(v, dict):
            paths.extend(_leaf_paths(v, f"{prefix}{k}."))
    return paths


def _read_yaml(path: Path, origin: dict, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    _check(path.is_file(), f"config file not found: {path}")
    _check(path not in seen, f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    _check(isinstance(raw, dict), f"{path}: top level must be a mapping, got {type(raw).__name__}")
    includes = raw.pop("include", []) or []
    includes = [includes] if isinstance(includes, str) else includes
    _check(isinstance(includes, list), f"{path}: include must be a file name or a list of them")
    merged: dict = {}
    for inc in includes:
        _check(isinstance(inc, str), f"{path}: include entries must be file names, got {inc!r}")
        merged = _merge(merged, _read_yaml(path.parent / inc, origin, seen + (path,)), {}, str(path))
    return _merge(merged, raw, origin, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    key, sep, value = text.partition("=")
    _check(bool(sep) and bool(key), f"override {text!r} is not of the form a.b=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def _set_path(d: dict, keys: list[str], value: Any, done: str = "") -> dict:
    out = dict(d)
    if len(keys) == 1:
        out[keys[0]] = value
    else:
        sub = out.get(keys[0], {})
        where = done + keys[0]
        _check(isinstance(sub, dict), f"override {where}.{'.'.join(keys[1:])}: {where} is not a section")
        out[keys[0]] = _set_path(sub, keys[1:], value, where + ".")
    return out


def _coerce(tp, value, where: str):
    """Checks `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value
    if origin is Literal:
        _check(value in typing.get_args(tp), f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is Any and not isinstance(value, list):
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, list):  # nested lists (mesh rule targets) become tuples: configs hash
        return tuple(_coerce(Any, v, where) for v in value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls, data: dict, origin: dict | None = None, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict, strictly."""
    origin = origin or {}
    _check(isinstance(data, dict), f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            path = prefix + str(key)
            near = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {path!r} (from {origin.get(path, 'code')}){hint}")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}{name} (from {origin.get(prefix + name, 'code')})"
        tp = hints[name]
        if value is not None and typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)  # `X | None`
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, origin, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, value, where)
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    _check(not missing, f"missing config keys: {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        srcs = sorted({v for k, v in origin.items() if k.startswith(prefix)})
        raise ConfigError(f"{e} (from {', '.join(srcs) or 'code'})") from None


def load_dict(paths: list[str | Path], overrides: list[str] = ()) -> tuple[dict, dict]:
    """Merged raw dict and the origin of every key, from files then overrides."""
    origin: dict = {}
    merged: dict = {}
    for p in paths:
        merged = _merge(merged, _read_yaml(Path(p), origin), {}, str(p))
    for text in overrides:
        keys, value = parse_override(text)
        merged = _set_path(merged, keys, value)
        origin[".".join(keys)] = f"override {text!r}"
    return merged, origin


def load_config(paths: list[str | Path], overrides: list[str] = ()) -> Config:
    """Loads a full run config (model + mesh + data + optim + train)."""
    merged, origin = load_dict(paths, overrides)
    return build(Config, merged, origin)


def load_model_config(paths: list[str | Path], overrides: list[str] = ()) -> ModelConfig:
    """Loads just the `model` section (files may hold other sections; they are ignored)."""
    merged, origin = load_dict(paths, overrides)
    _check("model" in merged, f"no `model:` section in {', '.join(map(str, paths))}")
    sections = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(merged) - sections)
    _check(not unknown, f"unknown top-level section(s) {unknown} (from {[origin.get(k, k) for k in unknown]}); "
           f"sections are {sorted(sections)} (overrides need the prefix, e.g. model.dim=64)")
    return build(ModelConfig, merged["model"], origin, "model.")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists) that `build` accepts back."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    """The resolved config as YAML (stored with checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
