"""Collectives of a compiled program, read from its optimized (post-SPMD) HLO text.

Collective volume (`collectives`): one device's view of one step. A collective's bytes are the
size of its *result* on one device (all-gather: the gathered array; reduce-scatter: the scattered
shard; all-reduce, all-to-all, collective-permute: the buffer), summed over tuple results. Async
pairs count once (at `-done`, whose shape is the result). Ops inside a `while` body (the scanned
layer stacks, the chunked loss) are multiplied by the loop's `known_trip_count` when XLA recorded
one (else counted once per occurrence); both branches of a conditional are counted.
"""

import math
import re
from collections import Counter
from typing import NamedTuple

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")


class Volume(NamedTuple):
    count: int  # collective ops executed per step
    bytes: int  # summed result bytes on one device


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([^\]]*)\]")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|branch_computations|true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples of them): `(f32[8,128]{1,0}, s32[])` -> 4100."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype == "pred" else int(m.group(1)) if (m := re.match(r"[a-z]+(\d+)", dtype)) else 0
        n = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        total += n * bits // 8
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """'(a, b) op(...), attrs' -> ('(a, b)', 'op(...), attrs'); tuple shapes nest parentheses."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: instruction lines}, and the ENTRY computation's name."""
    comps, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            is_entry = line.startswith("ENTRY")
            name = line.split()[1 if is_entry else 0].lstrip("%")
            comps[name] = []
            entry = name if is_entry else entry
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def _own_collectives(line: str, multiply: bool) -> tuple[Counter, list[tuple[str, int]]]:
    """(collectives of one instruction, [(callee, factor)]) for the call graph walk."""
    m = _INSTR.match(line)
    if not m:
        return Counter(), []
    shape, rest = _split_shape(m.group(1))
    op = rest.split("(", 1)[0].strip()
    found = Counter()
    base = op.removesuffix("-done")
    if base in KINDS and not op.endswith("-start"):  # `X-start` is counted at its `X-done`
        found[(base, "count")] += 1
        found[(base, "bytes")] += shape_bytes(shape)
    callees = []
    if op not in ("async-done", "async-update"):  # these name the same wrapped computation as the start
        factor = 1
        if op == "while" and multiply and (trips := _TRIPS.search(rest)):
            factor = int(trips.group(1))
        for key, target in _CALLEES.findall(rest):
            if (op == "while" and key != "body") or (key == "to_apply" and op != "call"):  # not reducers
                continue
            callees += [(t.strip().lstrip("%"), factor) for t in target.strip("{}").split(",") if t.strip()]
    return found, callees


def collectives(hlo_text: str, multiply_trip_counts: bool = True) -> dict[str, Volume]:
    """kind -> Volume(count, bytes) per step for one device, from optimized (post-SPMD) HLO text.

    Every kind in KINDS is present (zeros when absent). See the module docstring for conventions.
    """
    comps, entry = _computations(hlo_text)
    memo: dict[str, Counter] = {}

    def walk(name: str) -> Counter:  # computations form a DAG; memoised, each is parsed once
        if name not in memo:
            total = Counter()
            for line in comps.get(name, ()):
                own, callees = _own_collectives(line, multiply_trip_counts)
                total += own
                for callee, factor in callees:
                    total += Counter({k: v * factor for k, v in walk(callee).items()})
            memo[name] = total
        return memo[name]

    total = walk(entry) if entry else Counter()
    return {k: Volume(total[(k, "count")], total[(k, "bytes")]) for k in KINDS}

