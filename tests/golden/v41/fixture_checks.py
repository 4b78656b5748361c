"""Checks and diagnostics for generate_fixture.py (same folder; it imports this file by path).

Recorder: forward hooks on the router, indexer, Engram, decoder-layer and expert modules that keep
the stored per-layer outputs and every top-k margin (router, indexer, candidate blocks), re-deriving
the picks and asserting them equal to HF's. check_margins / selection_changes: the margin floors
and the noqat-vs-use_cache pick differences. mhc_stats, yarn_report: meta.json statistics.
patched_fake_quant / no_fake_quant: the noqat run's identity patch of HF's fake-quant functions.
QuantProbe: a recording wrapper around those functions for the fake-quant boundary distances.
"""

import contextlib
import inspect
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F


def put(m: dict, key: str, value):
    """Merge a per-call statistic over the calls of one run (chunked prefill calls twice)."""
    if key in m and value is not None and m[key] is not None:
        if key.endswith("selection"):
            value = m[key] + value
        else:
            value = (max if key.endswith("n_entries") else min)(m[key], value)
    m[key] = value


class Recorder:
    """Forward hooks on the router, indexer, Engram and decoder-layer modules. batch, seq_len: the
    stored runs' B, T (the shape of the kept routing outputs and of the `low` positions)."""

    def __init__(self, model, M, batch: int, seq_len: int):
        self.M, self.on, self.out, self.margins, self.clamp = M, False, {}, {}, {}
        self.B, self.T = batch, seq_len
        self.low = {}  # tag -> router layer -> [sequence, position, margin] below 1e-4 (T-long)
        self.tag, self.keep, self.prefix = "", False, ""  # margins key; keep outputs; their prefix
        self.handles = []
        for layer in model.model.layers:
            i = layer.layer_idx
            self.handles.append(layer.ffn.gate.register_forward_hook(self._router(i)))
            if layer.attn.indexer is not None:
                self.handles.append(layer.attn.indexer.register_forward_hook(self._indexer(i)))
            if layer.engram is not None:
                self.handles.append(layer.engram.register_forward_pre_hook(self._engram(i)))
            self.handles.append(layer.register_forward_hook(self._layer(i)))
            for expert in list(layer.ffn.experts) + [layer.ffn.shared_experts]:
                self.handles.append(expert.register_forward_hook(self._expert(i, expert)))

    def _router(self, i):
        def hook(mod, args, output):
            if not self.on:
                return
            m = self.margins.setdefault(self.tag, {})
            hidden = args[0]
            weights, indices = output
            flat = hidden.reshape(-1, hidden.shape[-1]).float()
            scores = mod.score_fn(F.linear(flat, mod.weight.float()) / mod.gate_temp)
            biased = (scores + mod.bias).sort(dim=-1, descending=True)
            k = mod.top_k
            assert torch.equal(biased.indices[:, :k].sort(-1).values, indices.sort(-1).values)
            gap = biased.values[:, k - 1] - biased.values[:, k]
            put(m, f"router.{i}", float(gap.min()))
            B, T = self.B, self.T
            if hidden.shape[1] == T:
                low = [[*divmod(j, T), float(gap[j])]
                       for j in (gap < 1e-4).nonzero()[:, 0].tolist()]
                if low:
                    self.low.setdefault(self.tag, {}).setdefault(f"router.{i}", []).extend(low)
            flips = (scores.topk(k, -1).indices.sort(-1).values != indices.sort(-1).values).any(-1)
            put(m, f"router.{i}.tokens_where_bias_changes_selection", int(flips.sum()))
            if not self.keep:
                return
            order, name = indices.argsort(dim=-1), f"{self.prefix}layers.{i}.ffn"
            self.out[f"{name}.expert_ids"] = indices.gather(1, order).view(B, T, k)
            self.out[f"{name}.routing_weights"] = weights.gather(1, order).view(B, T, k)
        return hook

    def _indexer(self, i):
        M = self.M

        def hook(mod, args, output):
            if not self.on:
                return
            m = self.margins.setdefault(self.tag, {})
            hidden, q_res, _latent, _first, position_ids, _cache, shared = args
            bias = shared["topk_bias"][:, 0]  # [B, S, n_entries]: 0 = picked, -inf = not
            n = bias.shape[-1]
            picked = torch.where(bias == 0, torch.arange(n).expand_as(bias), n).sort(-1).values
            k = mod.index_topk
            picked = picked[..., :k] if n >= k else F.pad(picked, (0, k - n), value=n)
            name = f"{self.prefix}layers.{i}.indexer"
            if self.keep:
                self.out[f"{name}.topk_ids"] = torch.where(picked == n, -1, picked)
            # recompute the scores from the hook's inputs (same ops as the module) for margins
            index_k = shared["index_k"]
            cos, sin = mod.rotary_emb(hidden, position_ids=position_ids, layer_type="compress")
            q = mod.wq_b(q_res).view(*q_res.shape[:2], mod.num_heads, mod.head_dim)
            q = M._fake_quant_fp4_block(M.apply_rotary_pos_emb(q, cos, sin), block_size=32)
            s = torch.einsum("bshd,btd->bsht", q.float(), index_k[:, 0].float()).relu()
            w = mod.weights_proj(hidden).float() * mod.heads_scaling
            scores = (s * mod.softmax_scale * w.unsqueeze(-1)).sum(2)
            lens = (position_ids.unsqueeze(-1) + 1) // mod.compress_ratio
            scores = scores.masked_fill(torch.arange(n).view(1, 1, -1) >= lens, float("-inf"))
            if mod.is_candidate_source:
                cand = shared["candidates"]
                if self.keep:
                    self.out[f"{name}.candidate_mask"] = cand.to(torch.uint8)
                put(m, f"candidate_blocks.{i}", block_margin(scores, lens, mod))
            elif mod.uses_candidates:
                scores = scores.masked_fill(~shared["candidates"], float("-inf"))
            srt = scores.sort(-1, descending=True).values
            live = srt[..., min(k, n - 1)] > float("-inf")  # rows with more than k candidates
            gap = (srt[..., k - 1] - srt[..., k])[live] if n > k else torch.empty(0)
            put(m, f"indexer.{i}", float(gap.min()) if gap.numel() else None)
            put(m, f"indexer.{i}.n_entries", n)
            mine = torch.where(scores > float("-inf"), 0.0, float("-inf"))
            top = scores.topk(min(k, n), -1).indices
            sel = torch.full_like(scores, float("-inf")).scatter(-1, top, 0.0) + mine
            assert torch.equal(sel, bias), f"indexer {i}: recomputed picks differ"
        return hook

    def _engram(self, i):
        def hook(mod, args):
            if self.on and self.keep and not self.prefix:
                assert args[2] is None  # this revision never passes a gate mask
                self.out[f"engram_hash.{i}"] = args[1].clone()
        return hook

    def _layer(self, i):
        def hook(mod, args, output):
            if self.on and self.keep and not self.prefix:
                self.out[f"layers.{i}.out_streams"] = output[0].detach().clone()
        return hook

    def _expert(self, i, expert):
        def hook(mod, args, output):
            if not (self.on and self.keep and not self.prefix):
                return
            x = args[0]
            gate, up = expert.w1(x).float(), expert.w3(x).float()
            lim = expert.swiglu_limit
            c = self.clamp.setdefault(i, [0, 0, 0])
            c[0] += int((gate > lim).sum())
            c[1] += int((up.abs() > lim).sum())
            c[2] += gate.numel()
        return hook


def block_margin(scores, lens, mod):
    """Gap between the last kept and the first dropped candidate block (finite scores only)."""
    bs = mod.candidate_block_size
    n = scores.shape[-1]
    blocks = F.pad(scores, (0, -n % bs), value=float("-inf")).unflatten(-1, (-1, bs)).amax(-1)
    last = (lens - 1) // bs
    blocks = blocks.masked_fill(torch.arange(blocks.shape[-1]) == last, float("inf"))
    srt = blocks.sort(-1, descending=True).values
    k = mod.candidate_topk_blocks
    if srt.shape[-1] <= k:
        return None
    live = srt[..., k] > float("-inf")
    gap = (srt[..., k - 1] - srt[..., k])[live]
    return float(gap.min()) if gap.numel() else None



@torch.no_grad()
def mhc_stats(model, ids) -> dict:
    """How far the layer-0 attention-site mixes are from trivial (for the report)."""
    layer = model.model.layers[0]
    streams = model.model.embed(ids).unsqueeze(2).expand(-1, -1, 4, -1)
    pre, post, comb = layer.hc_mixes(streams, layer.hc_attn_fn, layer.hc_attn_scale,
                                     layer.hc_attn_base)
    return {"pre_range": [float(pre.min()), float(pre.max())],
            "post_range": [float(post.min()), float(post.max())],
            "comb_range": [float(comb.min()), float(comb.max())]}


def yarn_report(model) -> dict:
    rot = model.model.rotary_emb
    inv = rot.compress_inv_freq
    plain = 1.0 / (160000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    return {"compress_inv_freq": inv.tolist(), "plain_theta160000_inv_freq": plain.tolist(),
            "interpolated_pairs": [j for j in range(8) if not torch.isclose(inv[j], plain[j])],
            "compress_attention_scaling": rot.compress_attention_scaling,
            "main_inv_freq": rot.main_inv_freq.tolist()}


FAKE_QUANT_FUNCTIONS = ("_fake_quant_fp8_block", "_fake_quant_fp4_block")  # module globals
# The noqat run (seeds unchanged: the QAT outputs must stay identical) has one router margin
# under 1e-4: layer 5, sequence 1, position 36, experts 1 vs 0, 2.9e-5 (~250 fp32 ulps of the
# ~1.07 scores). Every other noqat margin is asserted above 1e-4; this one above 1e-5.
NOQAT_MARGIN_EXCEPTIONS = {"router.5": 1e-5}


def check_margins(rec: Recorder):
    """Every top-k margin of the QAT runs above 1e-4; noqat above 1e-4 but NOQAT_MARGIN_EXCEPTIONS."""
    worst = min(v for tag in ("main", "use_cache") for k, v in rec.margins[tag].items()
                if v is not None and "." in k and not k.endswith(("n_entries", "selection")))
    assert worst > 1e-4, f"a top-k margin of the main run is only {worst}"
    for k, v in rec.margins["noqat"].items():
        if v is not None and "." in k and not k.endswith(("n_entries", "selection")):
            floor = NOQAT_MARGIN_EXCEPTIONS.get(k, 1e-4)
            assert v > floor, f"the noqat top-k margin {k} is only {v} (floor {floor})"
    assert rec.low.get("noqat", {}).keys() <= NOQAT_MARGIN_EXCEPTIONS.keys()


def selection_changes(rec: Recorder) -> dict:
    """Tokens whose picks differ between noqat and use_cache (both stored), per picked output."""
    changed = {}
    for key in sorted(rec.out):
        if key.startswith("noqat.") and key.endswith(("expert_ids", "topk_ids", "candidate_mask")):
            a, b = rec.out[key], rec.out["use_cache." + key[len("noqat."):]]
            changed[key[len("noqat."):]] = int((a != b).flatten(2).any(-1).sum())
    return changed


@contextlib.contextmanager
def patched_fake_quant(M, wrap):
    """Replace HF's fake-quant functions (module attributes, looked up at call time by the model
    code and by Recorder._indexer) with wrap(name, original); restore them afterwards."""
    saved = {name: getattr(M, name) for name in FAKE_QUANT_FUNCTIONS}
    try:
        for name, fn in saved.items():
            setattr(M, name, wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(M, name, fn)


def no_fake_quant(name, fn):
    return lambda x, *args, **kwargs: x.clone()  # identity (a fresh tensor, as the original)


def _e4m3_midpoints() -> torch.Tensor:
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique().sort().values.double()  # 0 .. 448
    return (grid[1:] + grid[:-1]) / 2


E4M3_MIDPOINTS = _e4m3_midpoints()
E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)


def midpoint_distance(v: torch.Tensor, mids: torch.Tensor):
    """|v| (fp32, exact in fp64) vs its nearest rounding midpoint b: (|v| - b) / b, and the same
    distance in fp32 ulps of b."""
    a = v.double().abs().flatten()
    i = torch.searchsorted(mids, a).clamp(1, len(mids) - 1)
    lo, hi = mids[i - 1], mids[i]
    b = torch.where((a - lo).abs() <= (hi - a).abs(), lo, hi)
    d = (a - b).abs()
    return (d / b).view(v.shape), (d / torch.exp2(torch.floor(torch.log2(b)) - 23)).view(v.shape)


def pow2_distance(t: torch.Tensor):
    """t > 0 vs its nearest power of two b (pow2ceil jumps just above each one): (|t - b|) / b,
    and in fp32 ulps of b (the ulp just below b where t < b)."""
    mant, _ = torch.frexp(t.double())  # t = mant * 2^e, mant in [0.5, 1)
    below = 2 * mant - 1  # relative to 2^(e-1) (t at or above it)
    above = 1 - mant  # relative to 2^e (t below it)
    rel = torch.minimum(below, above)
    ulps = torch.where(below <= above, below * 2.0**23, above * 2.0**24)
    return rel, ulps


def pow2ceil(t):
    """HF's `_pow2_ceil_scale` (same bit manipulation), restated so the probe is standalone."""
    bits = t.contiguous().view(torch.int32)
    k = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.exp2(k.to(torch.float32))


class QuantProbe:
    """Recording wrapper for the fake-quant functions: recomputes, from the tensors they receive
    and with their formulas, the quantised values x/s and the scale arguments, and keeps the
    smallest relative distance of each from its rounding boundary, with its location."""

    SITES: ClassVar[dict[str, str]] = {
        "window_kv_fp8": "x/s vs e4m3 midpoints; amax*f32(1/448) vs powers of two",
        "compressed_kv_fp4": "x/s vs e2m1 midpoints; max(amax,6*2^-9)/6 vs e4m3 midpoints",
        "indexer_qk_fp4": "x/s vs e2m1 midpoints; max(amax,6*2^-126)*f32(1/6) vs powers of two",
    }

    def __init__(self, model):
        self.model, self.layer, self.stats = model, None, {}
        self.handles = [layer.register_forward_pre_hook(self._enter(layer.layer_idx))
                        for layer in model.model.layers]

    def _enter(self, i):
        def hook(mod, args):
            self.layer = i
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def wrap(self, name, fn):
        sig = inspect.signature(fn)

        def wrapped(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            self.record(name, **bound.arguments)
            return fn(*args, **kwargs)
        return wrapped

    def record(self, name, x, block_size, e4m3_scales=False):
        n = x.shape[-1]
        if n % block_size:
            return
        blocks = x.float().reshape(*x.shape[:-1], n // block_size, block_size)
        amax = blocks.abs().amax(-1)
        if name == "_fake_quant_fp8_block":  # x: [B, 1, S, 32], the window kv
            site, tensor, lead = "window_kv_fp8", "kv", ("sequence", None, "position")
            t = amax.clamp_min(1e-4) * (1.0 / 448.0)
            q = (blocks / pow2ceil(t).unsqueeze(-1)).clamp(-448.0, 448.0)
            vmids, sdist = E4M3_MIDPOINTS, pow2_distance(t)
        elif e4m3_scales:  # x: [B, G, 32], the rotated compressed latents
            site, tensor, lead = "compressed_kv_fp4", "kv", ("sequence", "entry")
            t = amax.clamp_min(6.0 * 2.0**-9) / 6.0
            q = (blocks / t.to(torch.float8_e4m3fn).float().unsqueeze(-1)).clamp(-6.0, 6.0)
            vmids, sdist = E2M1_MIDPOINTS, midpoint_distance(t, E4M3_MIDPOINTS)
        else:  # the indexer's keys [B, G, 32] or queries [B, S, H, 32]
            site = "indexer_qk_fp4"
            tensor, lead = (("k", ("sequence", "entry")) if x.ndim == 3
                            else ("q", ("sequence", "position", "head")))
            t = amax.clamp_min(6.0 * 2.0**-126) * (1.0 / 6.0)
            q = (blocks / pow2ceil(t).unsqueeze(-1)).clamp(-6.0, 6.0)
            vmids, sdist = E2M1_MIDPOINTS, pow2_distance(t)
        ratio = self.model.model.layers[self.layer].attn.compress_ratio
        self._keep(site, "value", midpoint_distance(q, vmids), q, lead + ("block", "channel"),
                   tensor, ratio)
        self._keep(site, "scale", sdist, t, lead + ("block",), tensor, ratio)

    def _keep(self, site, what, dist, raw, axes, tensor, ratio):
        rel, ulps = (d.flatten() for d in dist)
        s = self.stats.setdefault(site, {}).setdefault(what, {
            "n": 0, "n_rel_below_1e-5": 0, "n_rel_below_1e-4": 0, "min": None})
        s["n"] += rel.numel()
        s["n_rel_below_1e-5"] += int((rel < 1e-5).sum())
        s["n_rel_below_1e-4"] += int((rel < 1e-4).sum())
        j = int(rel.argmin())
        if s["min"] is not None and s["min"]["rel"] <= float(rel[j]):
            return
        idx = np.unravel_index(j, tuple(raw.shape))
        where = {"layer": self.layer, "tensor": tensor}
        where.update({ax: int(v) for ax, v in zip(axes, idx) if ax is not None})
        if "entry" in where:
            where["position"] = where["entry"] * ratio  # one-shot prefill: first group at 0
        s["min"] = {"rel": float(rel[j]), "ulps_fp32": float(ulps[j]),
                    "quantity": float(raw.flatten()[j]), **where}

    def report(self):
        return {site: {"compared": rule, **self.stats.get(site, {})}
                for site, rule in self.SITES.items()}
