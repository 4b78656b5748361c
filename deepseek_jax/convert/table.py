"""One rule-table format and one walker for every checkpoint family (v3.py: V3 / V3.2, v4.py: V4,
v41.py: V4.1, article.py: MLA / DSA blocks on mHC streams).

A family's table is a sequence of `Scope`s (one per layer in the decoder's plan, MTP layers, the
globals), each holding `Rule`s. A rule ties one checkpoint tensor to one or more of our arrays,
with a transform each way; a rule marked `experts` stands for one tensor per routed expert (its
name holds `{e}`) whose our-side arrays carry the expert axis after the scan-repeat axis. Names are
given per *layout* (the spellings of one family: transformers' on-disk names, DeepSeek's official
names, transformers' in-memory names), so the same table reads and writes all of them.

`entries(family, cfg)` expands the table into `Entry`s: one checkpoint tensor each, with the slices
`(repeat, expert)` of our arrays it fills. The streaming importer and exporter (convert/importer.py and exporter.py) and
the in-memory `to_variables` / `from_variables` below are all walks over that one list.
"""

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.models.common import LayerKind

Arrays = tuple[np.ndarray, ...]
ToOurs = Callable[[np.ndarray, ModelConfig], Arrays]  # checkpoint tensor -> our arrays (one per `ours`)
ToCkpt = Callable[..., np.ndarray]  # (*our arrays, cfg) -> checkpoint tensor


def _always(kind: LayerKind, cfg: ModelConfig) -> bool:
    return True


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per table row
class Rule:
    ours: tuple[str, ...]  # our paths relative to the scope; "router:ffn/bias" = the router collection
    names: Mapping[str, str]  # layout -> checkpoint name relative to the scope's prefix
    to_ours: ToOurs
    to_ckpt: ToCkpt
    when: Callable[[LayerKind, ModelConfig], bool] = _always
    experts: bool = False  # one tensor per routed expert ("{e}" in the names)


@dataclass(frozen=True)
class Scope:
    keys: tuple[str, ...]  # where in our tree: ("layers_3_60", "block_0"), ("mtp_0",), ()
    repeat: int | None  # index along the scan-repeat axis, or None (not stacked)
    prefix: Mapping[str, str]  # layout -> name prefix ("model.layers.7.")
    rules: tuple[Rule, ...]
    kind: LayerKind
    n_experts: int | None = None  # routed experts of its `experts` rules (None: moe.n_routed_experts)


@dataclass(frozen=True)
class Dropped:
    """Checkpoint tensors this model does not hold (e.g. a vision tower): skipped, with one note on import."""

    pattern: str  # regex over checkpoint names
    what: str  # for the note


@dataclass(frozen=True)
class Family:
    """A checkpoint family: its layouts (the first is what `--layout hf` writes), its scopes, the
    checkpoint names read and dropped (copies of shared tensors), and config.json both ways."""

    name: str
    model_types: tuple[str, ...]  # config.json `model_type`s of this family
    layouts: tuple[str, ...]
    scopes: Callable[[ModelConfig], Iterable[Scope]]
    config_from_json: Callable[..., ModelConfig]  # (config.json dict, **overrides) -> ModelConfig
    config_to_json: Callable[[ModelConfig], dict]
    is_mtp: Callable[[str, int], bool]  # (checkpoint name, n_layers) -> is it an MTP layer's tensor
    skipped: tuple[str, ...] = ()  # regexes: tensors that duplicate ours (e.g. MTP copies of the head)
    # export (matched against official names): weights the releases store as FP8, tensors they keep F32
    fp8_names: str = "$^"
    f32_names: str = "$^"
    scale_fmt: str = "float32"  # FP8 block scales stored as "float32" (`weight_scale_inv`) | "ue8m0" (E8M0 bytes)
    pow2_scales: Callable[[ModelConfig], bool] = lambda cfg: False  # float32 scales that are powers of two
    scale_suffix: Mapping[str, str] | None = None  # layout -> the scale's name suffix after the base
    dropped: tuple[Dropped, ...] = ()  # tensors skipped with a note (import) and in `to_variables`
    # export: official names of row-local tensors written in row chunks (a family hook's `rows` wins)
    row_names: str = "$^"
    not_offered: tuple[tuple[str, str], ...] = ()  # (layout, why the family has none): export's error says so

    @property
    def ignored(self) -> tuple[str, ...]:
        """Regexes of the checkpoint names that map to nothing of ours (`skipped` and `dropped`)."""
        return (*self.skipped, *(d.pattern for d in self.dropped))


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its name in each layout, and the slices of our arrays it fills."""

    names: Mapping[str, str]
    leaves: tuple[tuple[str, ...], ...]  # full paths of our arrays: ("params", "layers_0_2", ...)
    index: tuple[int, ...]  # leading indices into each leaf: (repeat,), (repeat, expert), (expert,), ()
    rule: Rule

    def name(self, layout: str) -> str:
        if layout not in self.names:
            raise ConversionError(f"layout {layout!r} has no name for our {'/'.join(self.leaves[0])}")
        return self.names[layout]


def split_path(path: str) -> tuple[str, list[str]]:
    """'router:ffn/bias' -> ('router', ['ffn', 'bias']); 'attn/w_dq' -> ('params', ['attn', 'w_dq'])."""
    col, _, rest = path.rpartition(":")
    return col or "params", [p for p in rest.split("/") if p]


def entries(family: Family, cfg: ModelConfig) -> list[Entry]:
    """Every checkpoint tensor of `cfg` in `family`, in layer order (globals last)."""
    out = []
    for scope in family.scopes(cfg):
        for rule in scope.rules:
            if not rule.when(scope.kind, cfg):
                continue
            leaves = tuple((col, *scope.keys, *keys) for col, keys in map(split_path, rule.ours))
            lead = () if scope.repeat is None else (scope.repeat,)
            n_experts = cfg.moe.n_routed_experts if scope.n_experts is None else scope.n_experts
            for e in range(n_experts) if rule.experts else [None]:
                names = {lay: scope.prefix[lay] + n.format(e=e) for lay, n in rule.names.items()
                         if lay in scope.prefix}
                out.append(Entry(names, leaves, lead if e is None else (*lead, e), rule))
    return out


def in_block(rule: Rule) -> Rule:
    """`rule` for the block inside an MTP layer: our paths moved under `block/` (router ones too)."""
    ours = tuple(f"router:block/{p[7:]}" if p.startswith("router:") else f"block/{p}" for p in rule.ours)
    return Rule(ours, rule.names, rule.to_ours, rule.to_ckpt, rule.when, rule.experts)


def leaf_pieces(ents: Iterable[Entry]) -> dict[tuple[str, ...], list[tuple[tuple[int, ...], Entry, int]]]:
    """our leaf path -> [(index into the leaf, entry, which of the rule's outputs)], in entry order."""
    out: dict = {}
    for ent in ents:
        for k, leaf in enumerate(ent.leaves):
            out.setdefault(leaf, []).append((ent.index, ent, k))
    return out


def to_variables(state: Mapping[str, np.ndarray], family: Family, cfg: ModelConfig, layout: str) -> dict:
    """An in-memory checkpoint (names of `layout`, dequantised numpy) -> our {"params", "router"}
    (float arrays as float32, integer ones as int32). For small models and tests; convert/importer.py and exporter.py
    streams the same walk for real checkpoints. Missing and unexpected tensors are errors."""
    ents = entries(family, cfg)
    want = {e.name(layout) for e in ents}
    check_names(set(state), want, family.ignored, "the state dict")
    variables: dict = {}
    for leaf, pieces in leaf_pieces(ents).items():
        slices = {idx: our_array(ent.rule, state[ent.name(layout)], cfg, k) for idx, ent, k in pieces}
        _set(variables, leaf, _stack(slices))
    return variables


def our_array(rule: Rule, tensor: np.ndarray, cfg: ModelConfig, k: int) -> np.ndarray:
    """Output `k` of `rule` applied to one checkpoint tensor (floats computed in float32)."""
    a = np.asarray(tensor)
    a = a.astype(np.int32) if a.dtype.kind in "iub" else a.astype(np.float32)
    return np.ascontiguousarray(rule.to_ours(a, cfg)[k])


def _stack(slices: Mapping[tuple[int, ...], np.ndarray]) -> np.ndarray:
    if list(slices) == [()]:
        return slices[()]
    heads = sorted({idx[0] for idx in slices})
    return np.stack([_stack({idx[1:]: v for idx, v in slices.items() if idx[0] == h}) for h in heads])


def from_variables(variables: Mapping, family: Family, cfg: ModelConfig, layout: str) -> dict[str, np.ndarray]:
    """Our variables -> {checkpoint name of `layout`: numpy array} (in memory; exporter.py streams it)."""
    return {e.name(layout): ckpt_array(e, lambda leaf, idx: np.asarray(get_leaf(variables, leaf))[idx], cfg)
            for e in entries(family, cfg)}


def ckpt_array(ent: Entry, read: Callable[[tuple[str, ...], tuple[int, ...]], np.ndarray],
               cfg: ModelConfig) -> np.ndarray:
    """The checkpoint tensor of `ent` from our arrays; `read(leaf, index)` gives one leaf's slice."""
    return np.ascontiguousarray(ent.rule.to_ckpt(*(read(leaf, ent.index) for leaf in ent.leaves), cfg))


def check_names(have: set[str], want: set[str], skipped: Iterable[str], where: str) -> None:
    """Missing or unexpected tensors (beyond the `skipped` patterns): one error naming both lists."""
    missing = sorted(want - have)
    unexpected = sorted(n for n in have - want if not any(re.fullmatch(p, n) for p in skipped))
    if missing or unexpected:
        raise ConversionError(
            f"{where} does not match the model config: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )


def _few(items: list[str], n: int = 8) -> str:
    return f"{items[:n]}{'...' if len(items) > n else ''} ({len(items)})"


def _set(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def get_leaf(tree: Mapping, keys: tuple[str, ...]):
    """The value at `keys` (e.g. an Entry's leaf path) in a nested dict; an error naming the path if absent."""
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            raise ConversionError(f"our variables lack {'/'.join(keys)}")
        tree = tree[k]
    return tree


def iter_leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from iter_leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


# ----------------------------------------------------------------------------------------------
# Transforms shared by the family tables (checkpoint Linear weights are [out, in], ours [in, out])
# ----------------------------------------------------------------------------------------------


def t_ours(a, cfg):
    return (a.T,)


def t_ckpt(w, cfg):
    return w.T


def same_ours(a, cfg):
    return (a,)


def same_ckpt(w, cfg):
    return w


def concat(arrays, axis: int):
    """np.concatenate, or jnp's when shapes are being traced (`expected_shape` in convert/importer.py)."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays, axis=axis)
    import jax.numpy as jnp

    return jnp.concatenate(arrays, axis=axis)


def linear(ours: str, names: Mapping[str, str], when=_always, experts: bool = False) -> Rule:
    """A Linear weight: checkpoint [out, in] <-> our [in, out]."""
    return Rule((ours,), names, t_ours, t_ckpt, when, experts)


def vector(ours: str, names: Mapping[str, str], when=_always) -> Rule:
    """Stored as is (norm scales, biases, sinks, mHC parameters)."""
    return Rule((ours,), names, same_ours, same_ckpt, when)
