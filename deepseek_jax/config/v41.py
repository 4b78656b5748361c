"""DeepSeek-V4.1 parts: Engram conditional memory, cross-layer shared compressed KV, DSpark drafting.

Field names follow the `text_config` of transformers' `deepseek_v41` (`engram_*`, `kv_source_layer_ids`,
`dspark_*`) without their prefixes; `convert/v41.py` maps `config.json` onto them. Each part checks
its own invariants; `ModelConfig.__post_init__` checks them against the layer count.
"""

from dataclasses import dataclass
from typing import Literal

from deepseek_jax.config.errors import require as _check


@dataclass(frozen=True, kw_only=True)
class EngramConfig:
    """Engram (V4.1 reference §2; paper/demo: engram_mhc_multimodal.md §B): before each listed block,
    rows of a hashed n-gram table, one per (n-gram size, hash head), gate a value into every residual
    stream. Row ids are hashed on the host (engram_hash.py) and enter the model as int32."""

    layer_ids: tuple[int, ...]  # blocks with Engram before them (V4.1-Flash: [1, 14])
    num_embeddings: tuple[int, ...]  # rows of each layer's table (= Σ of its primes, checked by engram_hash)
    max_ngram_size: int = 4  # N: n-grams of sizes 2 … N
    n_heads: int = 8  # hash heads per n-gram size (each its own prime modulus)
    head_dim: int = 256  # width of one table row
    vocab_size: int = 16_000_000  # moduli: the unused primes >= vocab_size, per n-gram size and head
    compressed_vocab_size: int  # V', ids after the tokenizer's case/accent-folding map
    pad_id: int = 2  # raw token id whose compressed id fills look-backs that are blocked
    seed: int = 0  # multipliers: numpy default_rng(seed + 10007 · layer)
    # "v41": fused key/value projection, gate from the product of q/k weights (as released);
    # "paper": separate key norms per stream, value norm + causal dilated depthwise conv (the demo)
    variant: Literal["v41", "paper"] = "v41"
    conv_kernel: int = 4  # paper variant: taps of the causal conv, dilation = max_ngram_size
    table_lr_multiplier: float = 5.0  # optimizer: the tables' learning rate is this × the base rate
    table_weight_decay: bool = False  # optimizer: decay the tables too (the paper: no)

    def __post_init__(self):
        _check(len(self.layer_ids) > 0, "engram.layer_ids must list at least one layer")
        _check(len(set(self.layer_ids)) == len(self.layer_ids), f"engram.layer_ids repeat: {self.layer_ids}")
        _check(
            len(self.num_embeddings) == len(self.layer_ids),
            f"engram.num_embeddings needs one table size per engram.layer_ids entry "
            f"({len(self.layer_ids)}), got {len(self.num_embeddings)}",
        )
        for name in ("max_ngram_size", "n_heads", "head_dim", "vocab_size", "compressed_vocab_size"):
            _check(getattr(self, name) > 0, f"engram.{name} must be > 0, got {getattr(self, name)}")
        _check(self.max_ngram_size >= 2, f"engram.max_ngram_size must be >= 2, got {self.max_ngram_size}")
        _check(self.pad_id >= 0, f"engram.pad_id must be >= 0, got {self.pad_id}")
        _check(self.conv_kernel >= 1, f"engram.conv_kernel must be >= 1, got {self.conv_kernel}")
        _check(self.table_lr_multiplier > 0, "engram.table_lr_multiplier must be > 0")

    @property
    def n_columns(self) -> int:
        """Rows read per token and layer: (N − 1) n-gram sizes × n_heads, flat, n-gram-size-major."""
        return (self.max_ngram_size - 1) * self.n_heads

    @property
    def rows_shape(self) -> tuple[int, int]:
        """The trailing shape of the model's `engram_rows` input [B, T, L_engram, K]: (L_engram, K)."""
        return len(self.layer_ids), self.n_columns

    @property
    def mem_dim(self) -> int:
        return self.n_columns * self.head_dim


@dataclass(frozen=True, kw_only=True)
class SharedKVConfig:
    """V4.1's "causal encoder–decoder" schedule (reference §1.2): only kv-source layers compress; a
    layer with ratio > 0 reads the entries of the latest kv source at or before it and the top-k of
    the latest index source at or before it. Its presence makes every V4 attention layer V4.1's
    (no per-head q norm, compressors without position bias or overlap, indexer keys from the
    compressor's latent, the KV/indexer fake-quant when `qat`)."""

    kv_source_layers: tuple[int, ...]  # layers that own a compressor (V4.1-Flash: [2, 8, 14, 20])
    index_source_layers: tuple[int, ...]  # layers that run an indexer (kv sources + reindex layers)
    candidate_source_layer: int = -1  # its indexer picks candidate blocks for later ones; -1 = none
    candidate_topk_blocks: int = 2048  # blocks kept per query
    candidate_block_size: int = 8  # entries per candidate block
    # indexer keys (entries) scored per chunk of the streamed top-k and candidate pool (memory only;
    # rounded down to whole candidate blocks, at least one); 0 = all at once
    index_k_block: int = 1024
    # fake-quant HF and the release apply even in float32: window kv FP8 (1×32, UE8M0), compressed
    # entries FP4 (1×16, E4M3 scales), indexer q and k FP4 (1×32, UE8M0)
    qat: bool = True

    def __post_init__(self):
        _check(len(self.kv_source_layers) > 0, "shared_kv.kv_source_layers must list at least one layer")
        _check(
            set(self.kv_source_layers) <= set(self.index_source_layers),
            "shared_kv: every kv source runs an indexer, so kv_source_layers must be in index_source_layers",
        )
        _check(self.candidate_topk_blocks > 0 and self.candidate_block_size > 0,
               "shared_kv.candidate_topk_blocks and candidate_block_size must be > 0")
        _check(self.index_k_block >= 0, f"shared_kv.index_k_block must be >= 0, got {self.index_k_block}")
        _check(
            self.candidate_source_layer < 0 or self.candidate_source_layer in self.index_source_layers,
            f"shared_kv.candidate_source_layer ({self.candidate_source_layer}) must be an index source",
        )

    def check_schedule(self, ratios: tuple[int, ...], n_layers: int, index_topk: int) -> None:
        """HF's validation rules, over the main layers' compress ratios."""
        for layer in (*self.kv_source_layers, *self.index_source_layers):
            _check(0 <= layer < n_layers, f"shared_kv: layer {layer} is outside the model's {n_layers} layers")
        for layer in self.kv_source_layers:
            _check(ratios[layer] > 0, f"shared_kv: kv source {layer} needs compress ratio > 0")
        for layer, ratio in enumerate(ratios[:n_layers]):
            if ratio > 0 or layer in self.index_source_layers:
                src = self.kv_source(layer)
                _check(src >= 0, f"shared_kv: layer {layer} (ratio {ratio}) has no kv source at or before it")
                _check(ratios[src] == ratio or ratio == 0,
                       f"shared_kv: layer {layer} has ratio {ratio} but its kv source {src} has {ratios[src]}")
                _check(self.index_source(layer) >= src,
                       f"shared_kv: layer {layer} needs an index source at or after its kv source {src}")
        if self.candidate_source_layer >= 0:
            reach = (self.candidate_topk_blocks - 1) * self.candidate_block_size + 1
            _check(reach >= index_topk,
                   f"shared_kv: (candidate_topk_blocks − 1)·candidate_block_size + 1 = {reach} must be >= "
                   f"index_topk ({index_topk}), or the candidate pool can starve a later indexer")

    def kv_source(self, layer: int) -> int:
        """The latest kv source at or before `layer` (−1 if none)."""
        return max((s for s in self.kv_source_layers if s <= layer), default=-1)

    def index_source(self, layer: int) -> int:
        """The latest index source at or before `layer` (−1 if none)."""
        return max((s for s in self.index_source_layers if s <= layer), default=-1)


@dataclass(frozen=True, kw_only=True)
class DSparkConfig:
    """DSpark block drafting (V4.1 reference §1.11), the successor of MTP: `num_nextn_predict_layers`
    stages read the mean of the streams at the input of `target_layers`, draft `block_size` tokens at
    once ([accepted token, noise × (block_size − 1)], no causal mask inside the block) and refine them
    with a rank-`markov_rank` Markov head; a confidence head scores each draft."""

    block_size: int = 5
    noise_token_id: int = 128799
    target_layers: tuple[int, ...]  # main layers whose inputs are captured (V4.1-Flash: [37, 38, 39])
    markov_rank: int = 256
    n_routed_experts: int = 128  # each stage's MoE (the rest of moe.* is shared with the main model)
    n_activated_experts: int = 3

    def __post_init__(self):
        _check(self.block_size >= 2, f"dspark.block_size must be >= 2, got {self.block_size}")
        _check(len(self.target_layers) > 0, "dspark.target_layers must list at least one layer")
        for name in ("markov_rank", "n_routed_experts", "n_activated_experts"):
            _check(getattr(self, name) > 0, f"dspark.{name} must be > 0, got {getattr(self, name)}")
        _check(self.noise_token_id >= 0, f"dspark.noise_token_id must be >= 0, got {self.noise_token_id}")
        _check(self.n_activated_experts <= self.n_routed_experts,
               "dspark.n_activated_experts must be <= dspark.n_routed_experts")
