"""Hooks for generate_fixture.py (same folder, imported by path).

Glue: turns transformers' text-only `deepseek_v41` model (@0a2080b4) into the vision-language forward
without editing it: the merged embeddings replace `model.embed`'s output, the n-gram hash treats pads and
image spans as DEAD, the Engram gate is shut on them (the gate mask that revision never passes), and each
MoE gate receives `image_mask` = the span (selecting `bias_vl` there; that revision's layer calls the MoE
block without it). RouterRecorder: expert ids, top-k margins under the mask-selected bias, and how many
span tokens `bias_vl` moves. IndexerMargins: the v41 fixture's indexer hooks alone (picks, margins).
"""

import torch
import torch.nn.functional as F
from fixture_checks import Recorder


class MaskedHash:
    """The model's n-gram hash state with the image span DEAD as well as the pads."""

    def __init__(self, state, span):
        self.state, self.span = state, span

    def __call__(self, input_ids, position_ids, token_mask):
        return self.state(input_ids, position_ids, token_mask & ~self.span)

    def __getattr__(self, name):
        return getattr(self.state, name)


class Glue:
    def __init__(self, model, embeds, span, live):
        m, self.hash_ids, self.handles = model.model, {}, []
        gate_mask = live & ~span

        def embed_hook(mod, args, out):
            assert out.shape == embeds.shape
            return embeds.clone()

        def ffn_hook(mod, args, kwargs):
            return args, {**kwargs, "image_mask": span}

        def engram_hook(i):
            def hook(mod, args):
                streams, hash_ids, token_mask = args
                assert token_mask is None  # the revision passes none: we supply the VL one
                self.hash_ids[i] = hash_ids.clone()
                return streams, hash_ids, gate_mask
            return hook

        self.handles.append(m.embed.register_forward_hook(embed_hook))
        for layer in m.layers:
            self.handles.append(layer.ffn.register_forward_pre_hook(ffn_hook, with_kwargs=True))
            if layer.engram is not None:
                self.handles.append(layer.engram.register_forward_pre_hook(engram_hook(layer.layer_idx)))
        self.saved_hash, m.engram_hash_state = m.engram_hash_state, MaskedHash(m.engram_hash_state, span)
        self.model = m

    def remove(self):
        for h in self.handles:
            h.remove()
        self.model.engram_hash_state = self.saved_hash


class RouterRecorder:
    """Forward hooks on every MoE gate: picks re-derived with the bias the mask selects."""

    def __init__(self, model):
        self.on, self.tag, self.keep, self.prefix = False, "", False, ""
        self.handles = [layer.ffn.gate.register_forward_hook(self._hook(layer.layer_idx))
                        for layer in model.model.layers]
        self.reset()

    def reset(self):
        self.gaps, self.vl_moves, self.out = {}, {}, {}

    def _hook(self, i):
        def hook(mod, args, output):
            if not self.on:
                return
            hidden, mask = args
            B, T = hidden.shape[:2]
            weights, indices = output
            k = mod.top_k
            scores = mod.score_fn(F.linear(hidden.reshape(B * T, -1).float(), mod.weight.float()) / mod.gate_temp)
            bias = torch.where(mask.reshape(-1, 1), mod.bias_vl, mod.bias)
            biased = (scores + bias).sort(dim=-1, descending=True)
            assert torch.equal(biased.indices[:, :k].sort(-1).values, indices.sort(-1).values), f"router {i}"
            self.gaps.setdefault(self.tag, {})[i] = (biased.values[:, k - 1] - biased.values[:, k]).view(B, T)
            text_pick = (scores + mod.bias).topk(k, -1).indices.sort(-1).values
            moved = (text_pick != indices.sort(-1).values).any(-1).view(B, T)
            self.vl_moves.setdefault(self.tag, {})[i] = int(moved.sum())
            if self.keep:
                order, name = indices.argsort(dim=-1), f"{self.prefix}layers.{i}.ffn"
                self.out[f"{name}.expert_ids"] = indices.gather(1, order).view(B, T, k)
                self.out[f"{name}.routing_weights"] = weights.gather(1, order).view(B, T, k)
        return hook

    def margins(self, live):
        """{tag: {layer: min top-k gap over live positions}}."""
        return {tag: {i: float(g[live].min()) for i, g in per.items()} for tag, per in self.gaps.items()}

    def summary(self, live):
        m = self.margins(live)
        return " ".join(f"router[{tag}] {min(v.values()):.1e}" for tag, v in m.items())


class IndexerMargins(Recorder):
    """tests/golden/v41/fixture_checks.Recorder with its indexer hooks only (its router hook ignores
    `bias_vl`; its Engram hook asserts no gate mask)."""

    def __init__(self, model, M, batch, seq_len):  # noqa: D107 - mirrors the parent's fields
        self.M, self.B, self.T = M, batch, seq_len
        self.on, self.tag, self.keep, self.prefix = False, "", False, ""
        self.handles = [layer.attn.indexer.register_forward_hook(self._indexer(layer.layer_idx))
                        for layer in model.model.layers if layer.attn.indexer is not None]
        self.reset()

    def reset(self):
        self.out, self.margins, self.clamp, self.low = {}, {}, {}, {}

    def floor(self, tag):
        return min(v for k, v in self.margins.get(tag, {}).items()
                   if v is not None and not k.endswith(("n_entries", "selection")))

    def summary(self):
        return " ".join(f"indexer[{tag}] {self.floor(tag):.1e}" for tag in self.margins)


def check_floors(router: RouterRecorder, indexer: IndexerMargins, live, floor=1e-4) -> dict:
    """Every router / indexer / candidate-block margin of the stored runs above `floor`."""
    out = {"router": router.margins(live), "indexer": {t: dict(m) for t, m in indexer.margins.items()}}
    for tag, per in out["router"].items():
        assert min(per.values()) > floor, f"router margin of {tag}: {per}"
    for tag in indexer.margins:
        assert indexer.floor(tag) > floor, f"indexer margin of {tag}: {indexer.margins[tag]}"
    return out
