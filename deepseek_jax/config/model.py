"""Model schemas: the attention, MoE, residual and RoPE parts a decoder is composed from.

Field names copy DeepSeek's own `ModelArgs` (`dim`, `n_routed_experts`, `qk_rope_head_dim`, ...) so an
upstream config diffs against ours; `convert/v3.py` / `v4.py` map `config.json` names onto them. Each part
checks its own invariants; `ModelConfig.__post_init__` checks how the parts combine.
"""

from dataclasses import dataclass, field
from typing import Literal

from deepseek_jax.config.errors import require as _check
from deepseek_jax.config.media import AudioConfig, VideoConfig, VisionConfig
from deepseek_jax.config.v41 import DSparkConfig, EngramConfig, SharedKVConfig

# media kind -> the config field holding its placeholder id (`ModelConfig.media_token_ids`)
MEDIA_TOKEN_FIELDS = {"image": "vision.image_token_id", "audio": "audio.audio_token_id",
                      "video": "video.video_token_id"}


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
    q_block: int = 512  # queries per block of the streamed attention (memory only); 0 = one block
    k_block: int = 1024  # keys per chunk of its online softmax / DSA's running top-k (memory only); 0 = all
    # dense attention of a full forward (training, prefill): naive (per-head keys), absorbed (latent keys,
    # as decoding) or auto = the one with fewer FLOPs per (query, key) pair (`absorbed_training`); not used
    # by DSA (index set: its own forms) nor by the cuDNN kernel path (attention_impl: cudnn, per-head keys)
    train_form: Literal["auto", "naive", "absorbed"] = "auto"

    def __post_init__(self):
        _check(self.train_form in ("auto", "naive", "absorbed"),
               f"mla.train_form must be auto, naive or absorbed, got {self.train_form!r}")
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check(getattr(self, name) > 0, f"mla.{name} must be > 0, got {getattr(self, name)}")
        for name in ("q_block", "k_block"):
            _check(getattr(self, name) >= 0, f"mla.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.q_lora_rank >= 0, f"mla.q_lora_rank must be >= 0, got {self.q_lora_rank}")
        _check(
            self.qk_rope_head_dim % 2 == 0,
            f"mla.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
        )

    @property
    def qk_head_dim(self) -> int:  # H + R
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def absorbed_training(self) -> bool:
        """Whether a full forward's dense attention runs in latent space. Per (query, key) pair the
        naive form costs N(H + R) + N·O multiply-adds (scores, values), the absorbed N(C + R) + N·C;
        the per-token work (keys expanded vs queries absorbed and outputs un-absorbed) is N·C·(H + O)
        either way. So absorbed iff 2C < H + O: V3 (C 512, H = O = 128) naive, MaxText's
        deepseek3-tiny (C 16, H = O = 128) absorbed; ties stay naive (the HF numerics)."""
        if self.train_form != "auto":
            return self.train_form == "absorbed"
        return 2 * self.kv_lora_rank < self.qk_nope_head_dim + self.v_head_dim


@dataclass(frozen=True, kw_only=True)
class V4AttentionConfig:
    """DeepSeek-V4 shared-KV attention (layers/attention/v4.py). The per-layer compress ratio (0 =
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
    k_block: int = 1024  # compressed entries per chunk of the streamed HCA softmax / CSA top-k (memory only); 0 = all
    document_mask: bool = True  # packed documents (segment_ids): keys stay inside the query's document
    # (v4.py docstring); false = as released (HF / official attend across documents)

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
        _check(self.k_block >= 0, f"v4.k_block must be >= 0, got {self.k_block}")


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
    # expert-parallel dispatch over the mesh axis the rules give `experts` (layers/moe/dispatch.py);
    # ragged_a2a_emulated = ragged_a2a with ragged_all_to_all emulated by all-gathers (exact,
    # runs on XLA:CPU; for tests)
    dispatch: Literal["ring", "a2a", "ragged_a2a", "ragged_a2a_emulated", "dense"] = "ring"
    capacity_factor: float = 0.0  # a2a / dense buffers, x the balanced load; 0 = dropless (worst case)
    swiglu_limit: float = 0.0  # clamp of routed and shared SwiGLUs: gate <= lim, |up| <= lim (V4: 10); 0 = off
    weight_before_down: bool = False  # routing weight scales silu(gate)*up before w_down (V4), not after (V3)
    n_hash_layers: int = 0  # the first MoE layers route by token id via a fixed table `tid2eid` (V4: 3)
    gate_temp: float = 1.0  # router logits are divided by it before the score function (V4.1 `gate_temp`)
    vl_bias: bool = False  # a second selection bias `bias_vl` for tokens inside image spans (V4.1)

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
        _check(self.gate_temp > 0, f"moe.gate_temp must be > 0, got {self.gate_temp}")
        _check(self.route_scale > 0, f"moe.route_scale must be > 0, got {self.route_scale}")


@dataclass(frozen=True, kw_only=True)
class MHCConfig:
    """Manifold-constrained hyper-connections (V4 §2.2, layers/mhc.py): I parallel residual streams.
    The residual kind of any model: MLA (with or without the DSA indexer) blocks may run on them too."""

    hc_mult: int = 4  # I, residual streams (V4: 4)
    hc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp row/column rounds projecting comb (V4: 20)
    hc_eps: float = 1e-6  # added to pre, to the softmax and to every Sinkhorn denominator (V4: 1e-6)
    # V4.1: a sub-layer's input is collapsed with the previous site's `pre` (layer 0: stream 0), and
    # the final read uses the last site's, so there is no head of its own (`hc_head`)
    single_pass: bool = False

    def __post_init__(self):
        _check(self.hc_mult >= 1, f"mhc.hc_mult must be >= 1, got {self.hc_mult}")
        _check(self.hc_sinkhorn_iters >= 1, f"mhc.hc_sinkhorn_iters must be >= 1, got {self.hc_sinkhorn_iters}")
        _check(self.hc_eps >= 0, f"mhc.hc_eps must be >= 0, got {self.hc_eps}")


@dataclass(frozen=True, kw_only=True)
class IndexerConfig:
    """DeepSeek-V3.2 sparse attention (layers/attention/mla.py, indexer.py): the lightning indexer and its top-k."""

    index_n_heads: int  # P, indexer heads (V3.2: 64)
    index_head_dim: int  # Y, dims per indexer head; the first R are rotated (V3.2: 128)
    index_topk: int  # keys (tokens) each query attends to; U = min(index_topk, S) (V3.2: 2048)
    # training stage: True = dense warm-up (dense attention, KL over all visible keys, only the
    # indexer trained); False = sparse stage (top-k attention, KL over the selected keys, all trained)
    index_dense_warmup: bool = False
    index_q_block: int = 0  # queries per block of top-k + attention (memory only); 0 = mla.q_block

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


Remat = Literal["none", "full", "save_dots", "save_attention", "offload"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The parts of one decoder: attention (mla [+ index] or v4), residual (plain or mhc streams), FFN
    (dense for the first n_dense_layers, then MoE; learned or, for the first moe.n_hash_layers MoE
    layers, hash routing) and MTP (num_nextn_predict_layers)."""

    vocab_size: int  # V
    dim: int  # D
    inter_dim: int  # F of the dense MLP layers
    n_layers: int  # L, main-model blocks (HF `num_hidden_layers`)
    n_dense_layers: int  # leading blocks with a dense MLP (HF `first_k_dense_replace`)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    max_seq_len: int = 4096  # tokens, longest sequence the model is asked to handle
    num_nextn_predict_layers: int = 0  # MTP depth; 0 disables MTP
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype (params stay float32)
    # jax.checkpoint policy of the scanned blocks (none | full | save matmul outputs | save attention
    # outputs | offload matmul outputs to host)
    remat: Remat = "none"
    # dense MLA training / prefill: xla = streamed online softmax (any backend); cudnn = fused flash
    # attention via jax.nn.dot_product_attention (NVIDIA GPU, bf16; decoding and DSA stay streamed)
    attention_impl: Literal["xla", "cudnn"] = "xla"
    mla: MLAConfig | None = None  # V3 / V3.2 attention (exactly one of mla and v4)
    moe: MoEConfig
    rope: RopeConfig = field(default_factory=RopeConfig)  # V4: rope_theta of SWA layers, YaRN of CSA/HCA
    index: IndexerConfig | None = None  # V3.2 DSA in every block (MTP included); None = dense MLA
    v4: V4AttentionConfig | None = None  # V4 shared-KV attention (SWA / CSA / HCA by compress_ratios)
    compress_ratios: tuple[int, ...] = ()  # V4: per layer, then per MTP layer; 0 SWA, 4 CSA, else HCA
    mhc: MHCConfig | None = None  # hyper-connection residual streams; None = plain residual (v4 needs mhc)
    # FP8/FP4 fake-quant of the released numerics (quant.py, README); "none" = exact float math
    quant_sim: Literal["none", "fp8", "fp8_fp4"] = "none"
    # V4 / V4.1 decode-cache rows (layers/attention/cache_store.py): float (the cache dtype) | bf16 |
    # released (V4: fp8 kv + fp4 indexer keys; V4.1: mxfp8 window, nvfp4 entries, fp4 keys)
    cache_storage: Literal["float", "bf16", "released"] = "float"
    shared_kv: SharedKVConfig | None = None  # V4.1 attention and its cross-layer schedule (needs v4)
    engram: EngramConfig | None = None  # Engram memory before the listed blocks
    dspark: DSparkConfig | None = None  # the MTP layers are DSpark stages (V4.1; needs shared_kv)
    vision: VisionConfig | None = None  # V4.1's ViT + aligner: images fused into the token stream
    video: VideoConfig | None = None  # frames through the vision tower (ours; needs vision)
    audio: AudioConfig | None = None  # log-mel + conv front-end (ours)

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
        _check(
            self.moe.n_hash_layers <= self.n_moe_layers,
            f"moe.n_hash_layers ({self.moe.n_hash_layers}) must be <= the MoE layers "
            f"(n_layers - n_dense_layers = {self.n_moe_layers})",
        )
        if self.v4 is not None:
            self._check_v4()
        else:
            _check(not self.compress_ratios, "model.compress_ratios (V4 SWA/CSA/HCA per layer) needs model.v4")
            _check(self.quant_sim == "none", "model.quant_sim is wired for V4 models only (model.v4)")
            _check(self.cache_storage == "float", "model.cache_storage is wired for V4 models only (model.v4)")
        self._check_v41()

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

    def _check_v41(self):
        if self.shared_kv is not None:
            _check(self.v4 is not None, "model.shared_kv (V4.1 attention) needs model.v4")
            _check(self.cache_storage == "float", "model.cache_storage is not wired for V4.1 (model.shared_kv) yet")
            _check(not self.v4.document_mask, "v4.document_mask must be false with model.shared_kv (V4.1): its "
                   "attention gets no segment ids, so it attends across packed documents (as released)")
            self.shared_kv.check_schedule(self.compress_ratios, self.n_layers, self.v4.index_topk)
        if self.engram is not None:
            for layer in self.engram.layer_ids:
                _check(0 <= layer < self.n_layers, f"engram.layer_ids: {layer} is not a layer of {self.n_layers}")
            _check(self.engram.pad_id < self.vocab_size, f"engram.pad_id must be < vocab_size ({self.vocab_size})")
        if self.dspark is not None:
            _check(self.shared_kv is not None, "model.dspark (V4.1 drafting) needs model.shared_kv")
            _check(self.num_nextn_predict_layers > 0, "model.dspark needs num_nextn_predict_layers > 0 (its stages)")
            for layer in self.dspark.target_layers:
                _check(0 <= layer < self.n_layers, f"dspark.target_layers: {layer} is not a layer of {self.n_layers}")
            _check(self.dspark.noise_token_id < self.vocab_size, "dspark.noise_token_id must be < vocab_size")
        if self.mhc is not None and self.mhc.single_pass:
            _check(self.shared_kv is not None, "mhc.single_pass is V4.1's mHC: it needs model.shared_kv")
        self._check_media()

    def _check_media(self):
        _check(self.video is None or self.vision is not None, "model.video runs frames through model.vision: set it")
        ids = {MEDIA_TOKEN_FIELDS[kind]: v for kind, v in self.media_token_ids().items()}
        for name, v in ids.items():
            _check(v < self.vocab_size, f"model.{name} ({v}) must be < vocab_size ({self.vocab_size})")
        _check(len(set(ids.values())) == len(ids), f"media placeholder ids must differ, got {ids}")

    def media_token_ids(self) -> dict[str, int]:
        """Media kind ("image", "audio", "video") -> its placeholder id, for the modalities configured."""
        ids = {"image": None if self.vision is None else self.vision.image_token_id,
               "audio": None if self.audio is None else self.audio.audio_token_id,
               "video": None if self.video is None else self.video.video_token_id}
        return {kind: i for kind, i in ids.items() if i is not None}

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def row_positions(self) -> bool:
        """True when attention takes each row's own positions (0..T-1 + cache_index), not the caller's.

        V4 attention (any layer with `v4`) compresses fixed blocks of positions and slides its window
        over the row, so packed per-document positions and left-padded batches (positions_BT,
        cache_start_B) cannot be honoured; callers must pass plain rows and raise otherwise."""
        return self.v4 is not None
