"""Engram n-gram hashing on the host: table layout, compressed vocabulary, row ids, decode state.

DeepSeek-V4.1 reference (deepseek_v41_architecture.md) §2.1-§2.3 and §2.6; the paper/demo in
engram_mhc_multimodal.md §B.2-§B.4 (`CompressedTokenizer`, `NgramHashMapping`, `MultiHeadEmbedding`).
numpy int64 only: the hash is not bit-exact in int32, so it runs here and enters the model as int32
row ids (offsets added, every row < the layer's table size < 2³¹).

    x′_t      = cmap[x_t]                          compressed id (case/accent folding, §2.2)
    blocked_s = blocked_{s−1} ∨ (t − s < 0) ∨ dead_{t−s} ∨ seg_{t−s} ≠ seg_t    (s = 0 … X−1)
    tok_s     = pad′ if blocked_s else x′_{t−s}     pad′ = cmap[pad_id]
    h_2 = (tok_0·m_0) ⊕ (tok_1·m_1),  h_n = h_{n−1} ⊕ (tok_{n−1}·m_{n−1})     (⊕: 64-bit XOR)
    row_{n,k} = (h_n mod p_{n,k}) + offset_{n,k}     column u = (n − 2)·N + k

dead = image-span tokens (`dead_BT`) and segment 0 (padding); a segment change is a packed-document
start, treated like the sequence start (§2.6, an open question upstream: §6 item 4). Once a look-back
is blocked every longer one is pad; a dead current token hashes pure pad (its gate is zeroed anyway).
The products never overflow: m < ⌊int64_max / V′⌋ and x′ < V′ (§2.1).

Local letters: L Engram layers (`layer_ids` order), X look-back slots = max_ngram_size, W n-gram
sizes 2 … X (W = X − 1), N hash heads per size, U = W·N columns (flat, size-major), P history (X − 1).
"""

from dataclasses import dataclass

import numpy as np
import tokenizers
from tokenizers import Regex, normalizers

from deepseek_jax.config import ConfigError, EngramConfig

INT64_MAX = int(np.iinfo(np.int64).max)
DEAD = -1  # EngramHashState history: a slot that blocks (before the start, dead, or padding)
_SENTINEL = "\ue000"  # keeps a token that is exactly " " a space through Strip (§2.2 step 6)
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)  # Miller–Rabin: exact below 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller–Rabin with the first 13 prime bases (exact for n < 3.3·10²⁴)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unused_prime(start: int, seen: set[int]) -> int:
    """The smallest prime > start that is not in `seen` (the demo's `find_next_prime`)."""
    n = start + 1
    while n in seen or not is_prime(n):
        n += 1
    return n


@dataclass(frozen=True, eq=False)
class EngramLayout:
    """Per Engram layer: prime moduli, column offsets into its one table, and odd multipliers."""

    layer_ids: tuple[int, ...]
    primes_LWN: np.ndarray  # int64, p_{n,k}: globally distinct primes >= vocab_size
    offsets_LU: np.ndarray  # int64, exclusive cumsum of the layer's primes in column order
    multipliers_LX: np.ndarray  # int64, m_s = 2r + 1 with r ~ default_rng(seed + 10007·layer)
    pad_id: int  # raw id whose compressed id fills blocked look-backs

    @property
    def max_ngram_size(self) -> int:
        return self.multipliers_LX.shape[1]

    @property
    def n_columns(self) -> int:
        return self.offsets_LU.shape[1]

    @property
    def table_sizes(self) -> tuple[int, ...]:
        """Rows of each layer's table, Σ of its primes (= engram.num_embeddings)."""
        return tuple(int(s) for s in self.primes_LWN.sum((1, 2)))


def engram_layout(cfg: EngramConfig) -> EngramLayout:
    """Moduli (§2.1): for each layer, n-gram size and head, the next prime > vocab_size − 1 used
    nowhere yet (one "seen" set, layer-major, then n, then head); multipliers (§B.3):
    half = max(1, ⌊int64_max / V′⌋ // 2), m = 2·default_rng(seed + 10007·L).integers(0, half, X) + 1."""
    X, N = cfg.max_ngram_size, cfg.n_heads
    seen: set[int] = set()
    primes = []
    for _ in cfg.layer_ids:
        for _n in range(2, X + 1):
            start = cfg.vocab_size - 1  # every size restarts here; `seen` skips the used ones
            for _k in range(N):
                start = _next_unused_prime(start, seen)
                seen.add(start)
                primes.append(start)
    primes_LWN = np.array(primes, np.int64).reshape(len(cfg.layer_ids), X - 1, N)
    primes_LU = primes_LWN.reshape(len(cfg.layer_ids), -1)
    for layer, want, got in zip(cfg.layer_ids, cfg.num_embeddings, primes_LU.sum(-1)):
        if want != got:
            raise ConfigError(
                f"engram.num_embeddings: layer {layer} has {want} rows but its {primes_LU.shape[1]} "
                f"prime moduli sum to {int(got)} (set engram.num_embeddings to the sums)"
            )
        if got > np.iinfo(np.int32).max:
            raise ConfigError(f"engram.num_embeddings: layer {layer}'s {int(got)} rows overflow int32 row ids")
    offsets_LU = np.cumsum(primes_LU, axis=-1) - primes_LU
    half = max(1, (INT64_MAX // cfg.compressed_vocab_size) // 2)
    multipliers_LX = np.stack([
        2 * np.random.default_rng(cfg.seed + 10007 * layer).integers(0, half, size=X, dtype=np.int64) + 1
        for layer in cfg.layer_ids
    ])  # fmt: skip
    return EngramLayout(tuple(cfg.layer_ids), primes_LWN, offsets_LU, multipliers_LX, cfg.pad_id)


def _normalizer() -> normalizers.Normalizer:
    """§2.2: NFKC → NFD → strip accents → lowercase → runs of [ \\t\\r\\n] to " " → " " kept → strip."""
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])  # fmt: skip


def compressed_vocab(tokenizer) -> np.ndarray:
    """cmap [V] int64, raw id → compressed id (§2.2): each id decoded alone (special tokens kept);
    the key is the raw token string if the text holds U+FFFD (a partial byte sequence), else the
    normalised text, or the text itself if that is empty; new ids in order of first appearance.

    `tokenizer`: a `tokenizers.Tokenizer`, or deepseek_jax's `Tokenizer` (which wraps one)."""
    tok = getattr(tokenizer, "_tok", tokenizer)
    if not isinstance(tok, tokenizers.Tokenizer):
        raise TypeError(f"compressed_vocab needs a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    V = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may be sparse (as Tokenizer)
    texts = tok.decode_batch([[i] for i in range(V)], skip_special_tokens=False)
    norm = _normalizer()
    new_ids: dict[str, int] = {}
    cmap_V = np.empty(V, np.int64)
    for i, text in enumerate(texts):
        if "\ufffd" in text:
            key = tok.id_to_token(i)
        else:
            key = norm.normalize_str(text) or text
        cmap_V[i] = new_ids.setdefault(key, len(new_ids))
    return cmap_V


def check_compressed_vocab(cfg: EngramConfig, cmap_V: np.ndarray) -> None:
    """The tokenizer's folding must give exactly `engram.compressed_vocab_size` ids (it sizes the
    multipliers) and must cover `engram.pad_id`."""
    got = int(cmap_V.max()) + 1
    if got != cfg.compressed_vocab_size:
        raise ConfigError(
            f"engram.compressed_vocab_size={cfg.compressed_vocab_size} but the tokenizer folds to {got} ids"
        )
    if cfg.pad_id >= len(cmap_V):
        raise ConfigError(f"engram.pad_id={cfg.pad_id} is not an id of the tokenizer ({len(cmap_V)} ids)")


def _shift(a_BS: np.ndarray, s: int, fill) -> np.ndarray:
    """out[:, t] = a[:, t − s], `fill` where t − s < 0."""
    if s == 0:
        return a_BS
    out_BS = np.full_like(a_BS, fill)
    out_BS[:, s:] = a_BS[:, :-s]
    return out_BS


def lookback_tokens(xc_BS, pad: int, dead_BS, seg_BS, X: int) -> np.ndarray:
    """tok_BSX[b, t, s] = pad′ if blocked_s else x′_{t−s}, blocked_s accumulating over s (module doc)."""
    tok_BSX = np.empty((*xc_BS.shape, X), np.int64)
    blocked_BS = np.zeros(xc_BS.shape, bool)
    for s in range(X):
        blocked_BS |= _shift(dead_BS, s, True)  # t − s < 0 counts as dead
        if seg_BS is not None:
            blocked_BS |= _shift(seg_BS, s, -1) != seg_BS
        tok_BSX[..., s] = np.where(blocked_BS, pad, _shift(xc_BS, s, pad))
    return tok_BSX


def rows_from_lookback(layout: EngramLayout, tok_BSX: np.ndarray) -> np.ndarray:
    """rows_BSLU int32: h = running XOR of tok_s·m_s (per layer), row = h_n mod p_{n,k} + offset."""
    B, S, _ = tok_BSX.shape
    L, W, N = layout.primes_LWN.shape
    prod_BSLX = tok_BSX[:, :, None, :] * layout.multipliers_LX  # int64, cannot overflow (module doc)
    h_BSLW = np.bitwise_xor.accumulate(prod_BSLX, axis=-1)[..., 1:]  # h_2 … h_X
    rows_BSLWN = h_BSLW[..., None] % layout.primes_LWN  # h >= 0: XOR of non-negative products
    return (rows_BSLWN.reshape(B, S, L, W * N) + layout.offsets_LU).astype(np.int32)


def _compress(cmap_V: np.ndarray, tokens_BT) -> np.ndarray:
    tokens_BT = np.asarray(tokens_BT)
    if tokens_BT.ndim != 2:
        raise ValueError(f"engram hashing needs tokens [B, T], got shape {tokens_BT.shape}")
    if tokens_BT.size and (tokens_BT.min() < 0 or tokens_BT.max() >= len(cmap_V)):
        raise ValueError(f"token ids must be in [0, {len(cmap_V)}) of the compressed map, got "
                         f"[{tokens_BT.min()}, {tokens_BT.max()}]")
    return cmap_V[tokens_BT].astype(np.int64)


def hash_rows(layout: EngramLayout, cmap_V: np.ndarray, tokens_BT, segment_ids_BT=None, dead_BT=None) -> np.ndarray:
    """Engram row ids [B, T, L, U] int32 of a whole sequence (module doc). segment_ids_BT: packed
    documents (0 = padding, dead); dead_BT: tokens that block look-backs (image spans)."""
    xc_BT = _compress(cmap_V, tokens_BT)
    dead_BT = np.zeros(xc_BT.shape, bool) if dead_BT is None else np.asarray(dead_BT, bool)
    seg_BT = None if segment_ids_BT is None else np.asarray(segment_ids_BT)
    if seg_BT is not None:
        dead_BT = dead_BT | (seg_BT == 0)
    pad = int(cmap_V[layout.pad_id])
    return rows_from_lookback(layout, lookback_tokens(xc_BT, pad, dead_BT, seg_BT, layout.max_ngram_size))


class EngramHashState:
    """Incremental hashing for generation: per row the last X − 1 compressed ids (DEAD where a slot
    blocks) and their segments. Any chunking of `step` gives `hash_rows` of the concatenation."""

    def __init__(self, layout: EngramLayout, cmap_V: np.ndarray, batch_size: int):
        self.layout, self.cmap_V = layout, cmap_V
        P = layout.max_ngram_size - 1
        self.xc_BP = np.full((batch_size, P), DEAD, np.int64)  # nothing before the start
        self.seg_BP = np.zeros((batch_size, P), np.int64)
        self.seg_B = np.ones(batch_size, np.int64)  # the current segment (steps without segment ids)

    def step(self, tokens_BT, dead_BT=None, segment_ids_BT=None) -> np.ndarray:
        """Row ids [B, T, L, U] int32 of T >= 1 new tokens; advances the history."""
        xc_BT = _compress(self.cmap_V, tokens_BT)
        B, T = xc_BT.shape
        if B != len(self.seg_B):
            raise ValueError(f"EngramHashState holds {len(self.seg_B)} rows, got tokens for {B}")
        dead_BT = np.zeros((B, T), bool) if dead_BT is None else np.asarray(dead_BT, bool)
        if segment_ids_BT is None:
            seg_BT = np.broadcast_to(self.seg_B[:, None], (B, T))
        else:
            seg_BT = np.asarray(segment_ids_BT, np.int64)
            dead_BT = dead_BT | (seg_BT == 0)
        P = self.xc_BP.shape[1]
        xc_BS = np.concatenate([self.xc_BP, xc_BT], axis=1)  # S = P + T
        dead_BS = np.concatenate([self.xc_BP == DEAD, dead_BT], axis=1)
        seg_BS = np.concatenate([self.seg_BP, seg_BT], axis=1)
        pad = int(self.cmap_V[self.layout.pad_id])
        tok_BSX = lookback_tokens(np.where(dead_BS, pad, xc_BS), pad, dead_BS, seg_BS, P + 1)
        self.xc_BP = np.where(dead_BS, DEAD, xc_BS)[:, -P:]
        self.seg_BP, self.seg_B = seg_BS[:, -P:], seg_BS[:, -1].copy()
        return rows_from_lookback(self.layout, tok_BSX[:, P:])

    def reorder(self, indices_B) -> None:
        """Keeps rows `indices_B` in that order (beam reorder, batch row selection)."""
        indices_B = np.asarray(indices_B)
        self.xc_BP, self.seg_BP, self.seg_B = self.xc_BP[indices_B], self.seg_BP[indices_B], self.seg_B[indices_B]
