"""The optimizer: one optax chain, AdamW for everything or DeepSeek-V4's Muon/AdamW split.

    g <- g · min(1, clip_norm / ‖g‖₂)                 (global norm, over both groups at once)
    AdamW group:  p <- p - η_t (m̂ / (√v̂ + ε) + λ p)   (λ on matrices only, see ADAMW_PARAMS)
    Muon group:   M <- β M + (1-β) g;  O = NS₅(β M̂ + (1-β) ĝ)   (Nesterov; 5 Newton-Schulz steps)
                  p <- p - η_t (0.2 √max(m, n) O + λ p)        (m x n: one layer's, one expert's)

Which group a parameter joins is decided by its name (the last path element) from two tables:
`MUON_MATRICES` (hidden projections, with their input/output axes; numbered names such as the
audio convs' `w_conv{i}` by pattern in `MUON_PATTERNS`) and `ADAMW_PARAMS`. A
parameter of two or more dimensions in neither table raises, so a new weight cannot silently land
in the wrong group or skip its weight-decay decision. Inside an Engram module (a path element
`engram…`) the names are looked up in `ENGRAM_MUON` / `ENGRAM_ADAMW` instead (its `w_kv`, `w_k`
have other shapes than attention's), and its hashed tables `table` form a third group:

    table group:  Adam with η_t · table_lr_multiplier;  decoupled decay λ only if table_weight_decay
                  (the Engram paper: Adam at 5x the base rate, no decay), under AdamW and Muon alike

with both settings read from `model.engram` (`make_optimizer(..., engram=cfg.model.engram)`).

Frozen parameters (DeepSeek-V3.2's dense warm-up trains the lightning indexers alone): an optional
`trainable` tree splits the parameters with `optax.partition`; the frozen ones get zero updates and
no optimizer state, and clipping sees only the trained gradients.

Learning rates. Muon's orthogonalised update has singular values ≈ 1, hence an RMS of
1/√max(m, n) that depends on the shape; scaling it by 0.2·√max(m, n) ("consistent RMS",
Moonlight, Liu et al. 2025, arXiv:2502.16982 §2.2) sets every matrix's update RMS to ≈ 0.2, the
typical RMS of an AdamW update. AdamW's learning rate and weight decay can then be reused for the
Muon group unchanged: `muon_lr = 0` means "use `lr`".

References: DeepSeek-V4 report (Muon for hidden matrices, AdamW for embedding, head and norms);
optax.contrib.scale_by_muon (Keller Jordan's Muon, batched over leading axes with vmap).
"""

import math
import re

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from deepseek_jax.config import EngramConfig, OptimConfig

MUON_MOMENTUM = 0.95  # β of Muon's Nesterov momentum (Keller Jordan, Moonlight); not cfg.b1
MUON_RMS = 0.2  # target update RMS, matching AdamW's (Moonlight §2.2)

# name -> (number of trailing input axes, number of trailing output axes) of the per-layer,
# per-expert matrix. The product of the input axes is Muon's reduction (fan-in) dimension and the
# product of the output axes its output dimension; any leading axes ("layers" from nn.scan,
# "experts" of the routed stack) are batch axes, orthogonalised one slice at a time.
MUON_MATRICES = {
    "w_dq": (1, 1),  # [D, Q]
    "w_uq": (1, 2),  # [Q, N, H+R]
    "w_q": (1, 2),  # [D, N, H+R] (no query latent)
    "w_dkv": (1, 1),  # [D, C+R]
    "w_uk": (1, 2),  # [C, N, H]
    "w_uv": (1, 2),  # [C, N, O]
    "w_o": (2, 1),  # [N, O, D]
    "w_gate": (1, 1),  # [D, F]: dense MLP, shared experts, and routed experts under [E, ...]
    "w_up": (1, 1),  # [D, F]
    "w_down": (1, 1),  # [F, D]
    "w_eh": (1, 1),  # [2D, D], MTP's projection of [emb; h]
    "w_k": (1, 1),  # [D, Y], the V3.2 indexer's key projection (its w_uq [Q, P, Y] is above)
    # DeepSeek-V4 (its report: Muon for all but embedding, head, mHC base/scale and norms)
    "w_kv": (1, 1),  # [D, X] shared K=V head; compressors' [D, c·X] (and their w_gate, above)
    "w_oa": (2, 1),  # [W, P, X, Y]: one [P·X, Y] matrix per output group (W a batch axis)
    "w_ob": (2, 1),  # [W, Y, D]: one [W·Y, D] matrix
    "fn": (2, 1),  # [I, D, Z] mHC mixing map (and the head's [I, D, I])
    "w_e": (1, 1),  # [D, D] MTP embedding projection
    "w_h": (1, 1),  # [D, D] MTP stream projection
    "main_proj": (1, 1),  # [n·D, D] DSpark's projection of the captured target-layer inputs (V4.1)
    # media front-ends (layers/vision.py, layers/audio.py): ViT, aligner, audio convs and projector
    "w_patch": (1, 1),  # [3p², W]
    "w_qkv": (1, 3),  # [W, 3, N, Y]
    "w_gate_up": (1, 2),  # [W, 2, F]
    "w1": (2, 1),  # [W, r², F] aligner: the r² unshuffled patches are its fan-in
    "w2": (1, 1),  # [F, D]
    "w_proj1": (1, 1),  # [C, D]
    "w_proj2": (1, 1),  # [D, D]
}
# names numbered per layer, by regular expression: the audio convs w_conv0, w_conv1, ... (as many as
# audio.conv_strides) [3, I, C], whose taps × input channels are the fan-in
MUON_PATTERNS = {r"w_conv\d+": (2, 1)}
MAX_BATCH_AXES = 2  # "layers" and "experts"

# Engram (layers/engram.py), by name inside an `engram` scope. X = K·H, the flattened memory width.
ENGRAM_MUON = {
    "w_kv": (1, 2),  # [X, I+1, D]: the fused key/value projection, one matrix (official `engram.wkv`)
    "w_k": (1, 2),  # [X, I, D] paper variant: the I key projections, fused as the paper notes
    "w_v": (1, 1),  # [X, D] paper variant: the shared value
}
# the tables are their own group (TABLE); the rest are gains and biases: no decay. The paper's depthwise
# conv [W, I, D] is a per-channel filter (W taps per channel), not a map between spaces: no decay either
ENGRAM_ADAMW = {
    "q_weight": False, "k_weight": False, "q_norm": False, "k_norm": False, "conv_norm": False,
    "b_k": False, "b_v": False, "conv": False,
}
TABLE = "table"

# AdamW parameters by name -> whether weight decay applies. The embedding is a lookup table whose
# rows of rare tokens see few gradients, so decay would mostly shrink them towards zero; the config
# excludes embeddings. The output head is an ordinary [D, V] matrix (untied here) and is decayed,
# like every other matrix; norms and biases never are. The router [D, E] is a matrix too, but the
# V4 report does not say which optimizer it gets: with E small next to D it has rank <= E, and
# orthogonalising would set all E directions that steer discrete top-k choices to equal size, an
# untested change to routing dynamics; it stays on AdamW, as in V3.
# The V3.2 indexer's per-head weights `w_weights` [D, P] are a small gate like the router (rank <= P)
# and are treated like it.
ADAMW_PARAMS = {
    "embedding": False, "w_head": True, "w_router": True, "w_weights": True, "scale": False, "bias": False,
    "ape": False,  # V4 compressor's learned position bias [m, c·X]: a bias table, not a map
    "sink": False, "base": False,  # V4 attention sinks [N]; mHC static biases [Z]
    "b_qkv": False, "b_o": False, "video_frame": False,  # ViT biases (stacked [L, ...]); frame delimiters [G, D]
    # DSpark (V4.1): the Markov head's token table [V, r] is a lookup like the embedding, its [r, V]
    # output and the confidence head [D + r, 1] are matrices like the LM head (rank <= r, and 1)
    "markov_embed": False, "markov_head": True, "confidence": True,
}


def lr_schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then cosine to peak·min_lr_ratio at total_steps.

    η_t = peak·t/W for t < W;  η_t = end + (peak - end)·(1 + cos(π·min(1, (t-W)/(S-W))))/2
    """
    peak = cfg.lr if peak is None else peak
    end, warmup = peak * cfg.min_lr_ratio, cfg.warmup_steps
    decay = max(total_steps - warmup, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaf_name(path) -> str:
    return _path_name(path).rsplit("/", 1)[-1]


def _in_engram(path) -> bool:
    return any(part.startswith("engram") for part in _path_name(path).split("/")[:-1])


def _muon_axes(path) -> tuple[int, int] | None:
    """(input axes, output axes) of a Muon matrix by name (from ENGRAM_MUON inside an Engram module;
    outside it MUON_MATRICES, then MUON_PATTERNS)."""
    name = _leaf_name(path)
    if _in_engram(path):
        return ENGRAM_MUON.get(name)
    if name in MUON_MATRICES:
        return MUON_MATRICES[name]
    return next((axes for pattern, axes in MUON_PATTERNS.items() if re.fullmatch(pattern, name)), None)


def _classify(path, leaf) -> str:
    """'muon' | 'adamw' | 'table' (an Engram table) for one parameter; raises for an unknown matrix."""
    name, ndim = _leaf_name(path), len(leaf.shape)
    if _muon_axes(path) is not None:
        matrix_axes = sum(_muon_axes(path))
        if not matrix_axes <= ndim <= matrix_axes + MAX_BATCH_AXES:
            raise ValueError(
                f"parameter {_path_name(path)} has shape {leaf.shape}: a {name} has "
                f"{matrix_axes} matrix axes and at most {MAX_BATCH_AXES} leading layers/experts"
                " axes"
            )
        return "muon"
    if _in_engram(path) and name == TABLE:
        return "table"
    if name in (ENGRAM_ADAMW if _in_engram(path) else ADAMW_PARAMS) or ndim <= 1:
        return "adamw"
    where = "ENGRAM_MUON or ENGRAM_ADAMW" if _in_engram(path) else "MUON_MATRICES or ADAMW_PARAMS"
    raise ValueError(
        f"parameter {_path_name(path)} (shape {leaf.shape}) is in no optimizer group: add "
        f"{name!r} to {where} in deepseek_jax/optim.py"
    )


def param_groups(params):
    """'muon', 'adamw' or 'table' for every leaf of `params` (same tree), by parameter name."""
    return jax.tree_util.tree_map_with_path(_classify, params)


def _dimension_numbers(path, leaf) -> MuonDimensionNumbers | None:
    if _classify(path, leaf) != "muon":
        return None
    n_in, n_out = _muon_axes(path)
    ndim = len(leaf.shape)
    first = ndim - n_in - n_out  # leading batch axes are listed in neither
    reduction, output = range(first, first + n_in), range(ndim - n_out, ndim)
    return MuonDimensionNumbers(reduction_axis=tuple(reduction), output_axis=tuple(output))


def muon_dimension_numbers(params):
    """MuonDimensionNumbers per Muon leaf (leading layers/experts axes = batch); None elsewhere."""
    return jax.tree_util.tree_map_with_path(_dimension_numbers, params)


def _decays(path, leaf, engram: EngramConfig | None = None) -> bool:
    group = _classify(path, leaf)  # raises for an unknown matrix: it needs a weight-decay decision too
    if group == "table":
        return engram is not None and engram.table_weight_decay
    adamw = ENGRAM_ADAMW if _in_engram(path) else ADAMW_PARAMS
    return group == "muon" or (adamw.get(_leaf_name(path), False) and len(leaf.shape) >= 2)


def decay_mask(params, engram: EngramConfig | None = None):
    """True where decoupled weight decay applies: Muon matrices, w_head, w_router; Engram tables
    only with `engram.table_weight_decay`."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _decays(path, leaf, engram), params)


def _adamw(cfg: OptimConfig, schedule, mask) -> optax.GradientTransformation:
    return optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
    )


def _table_adam(cfg: OptimConfig, engram: EngramConfig, total_steps: int) -> optax.GradientTransformation:
    """The Engram tables' Adam: the base schedule × table_lr_multiplier (the decay, when on, scales
    with it as everywhere: p <- p - η·mult·(u + λp))."""
    schedule = lr_schedule(cfg, total_steps, cfg.lr * engram.table_lr_multiplier)
    decay = cfg.weight_decay if engram.table_weight_decay else 0.0
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=decay)


def _masked_tree(tree):
    """None -> MaskedNode: inside optax.partition a group sees the other group's leaves as
    MaskedNode, and per-leaf trees handed to its transforms must have the same structure."""
    is_leaf = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    return jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, tree, is_leaf=is_leaf)


def _rms_scale(d: MuonDimensionNumbers | None, leaf) -> float | None:
    """0.2·√max(fan_in, fan_out) of one Muon leaf, from its per-slice matrix (no batch axes)."""
    if d is None:
        return None
    fan_in = math.prod(leaf.shape[a] for a in d.reduction_axis)
    fan_out = math.prod(leaf.shape[a] for a in d.output_axis)
    return MUON_RMS * math.sqrt(max(fan_in, fan_out))


def _muon(cfg: OptimConfig, schedule, params) -> optax.GradientTransformation:
    dims = muon_dimension_numbers(params)
    is_leaf = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    scales = _masked_tree(jax.tree.map(_rms_scale, dims, params, is_leaf=is_leaf))
    rms_match = optax.stateless(lambda u, p=None: jax.tree.map(lambda x, s: x * s, u, scales))
    orthogonalise = scale_by_muon(
        beta=MUON_MOMENTUM, eps=cfg.eps, nesterov=True, weight_dimension_numbers=_masked_tree(dims)
    )  # eps: Frobenius normalisation before Newton-Schulz
    return optax.chain(
        orthogonalise,
        rms_match,  # consistent RMS (Moonlight): the same lr and weight decay as AdamW
        optax.add_decayed_weights(cfg.weight_decay),  # every Muon leaf is a matrix
        optax.scale_by_learning_rate(schedule),
    )


def indexer_only(params):
    """True for the V3.2 lightning indexers' parameters (any path through an `indexer` scope):
    the `trainable` tree of the dense warm-up stage."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "indexer" in _path_name(path).split("/"), params)


def make_optimizer(
    cfg: OptimConfig, params, total_steps: int, trainable=None, engram: EngramConfig | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW for all (`adamw`) or the Muon/AdamW split (`muon`); Engram
    tables, if any, get their own Adam (module docstring), which needs `engram` (`cfg.model.engram`).

    `params` may be arrays or ShapeDtypeStructs; only their paths and shapes are read.
    `trainable`: an optional bool tree like `params`; False leaves are frozen (zero updates).
    """
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
        kept = jax.tree.map(lambda p, t: p if t else optax.MaskedNode(), params, trainable)
        return optax.partition(  # the inner chain is built on the trained leaves' tree only
            {"train": make_optimizer(cfg, kept, total_steps, engram=engram), "frozen": optax.set_to_zero()},
            labels,
        )
    groups = param_groups(params)  # raises for an unknown matrix
    adamw_lr = lr_schedule(cfg, total_steps, cfg.lr)
    transforms = {"adamw": _adamw(cfg, adamw_lr, decay_mask)}
    if "table" in jax.tree.leaves(groups):
        if engram is None:
            raise ValueError("the parameters hold Engram tables: pass make_optimizer(..., engram=cfg.model.engram), "
                             "whose table_lr_multiplier and table_weight_decay set their optimizer")
        transforms["table"] = _table_adam(cfg, engram, total_steps)
    if cfg.name == "adamw":
        groups = jax.tree.map(lambda g: "adamw" if g == "muon" else g, groups)
    else:
        transforms["muon"] = _muon(cfg, lr_schedule(cfg, total_steps, cfg.muon_lr or cfg.lr), params)
    if cfg.name == "adamw" and len(transforms) == 1:  # one group: the plain chain (its state layout)
        inner = _adamw(cfg, adamw_lr, decay_mask(params))
    else:
        inner = optax.partition(transforms, groups)
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, inner)
