"""An independent numpy float32 forward of the tiny V4.1 model of this fixture, written from the
semantics in NOTES.md (it calls nothing from transformers or torch), checked against
reference.safetensors. Not a test and not run by CI; a readable, executable spec for the port:

    python tests/golden/v41/numpy_reference.py      # needs numpy, safetensors, tokenizers

mode "pool" is what HF computes without a cache (`logits`, the fixture's target): each kv source
appends its entries to one running pool. mode "per_source" is the cache path (`logits_use_cache`):
each kv source replaces the pool. Both reproduce HF to about 3e-6, with identical Engram hash ids,
token map, indexer picks, candidate masks, expert ids and routing weights.
"""

import json
import math
import re
import unicodedata
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
W = load_file(HERE / "weights.safetensors")
R = load_file(HERE / "reference.safetensors")
C = json.loads((HERE / "config.json").read_text())
f32 = np.float32
EPS = f32(C["rms_norm_eps"])
HC_EPS = f32(C["hc_eps"])
RD, HD, NH = C["qk_rope_head_dim"], C["head_dim"], C["num_attention_heads"]
RATIOS, KVS, IXS = C["compress_ratios"], C["kv_source_layer_ids"], C["index_source_layer_ids"]
CAND, HC, DIM = C["candidate_source_layer_id"], C["hc_mult"], C["hidden_size"]


def token_map() -> np.ndarray:
    """The Engram compressed-vocabulary map, from tokenizer.json with unicodedata."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    keys, out = {}, []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(i)
        else:
            s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
            s = "".join(c for c in s if unicodedata.category(c) != "Mn").lower()
            s = re.sub(r"[ \t\r\n]+", " ", s)
            s = ("\ue000" if s == " " else s).strip().replace("\ue000", " ")
            key = s or text
        out.append(keys.setdefault(key, len(keys)))
    return np.array(out, dtype=np.int64)


def primes() -> list:
    """[layer][n-gram - 2][head]: next unused primes above engram_vocab_size - 1."""
    seen, out = set(), []

    def is_prime(x):
        return x > 1 and all(x % d for d in range(2, math.isqrt(x) + 1))

    for _ in C["engram_layer_ids"]:
        layer = []
        for _ in range(C["engram_max_ngram_size"] - 1):
            cur, row = C["engram_vocab_size"] - 1, []
            for _ in range(C["engram_n_heads"]):
                cur += 1
                while not is_prime(cur) or cur in seen:
                    cur += 1
                seen.add(cur)
                row.append(cur)
            layer.append(row)
        out.append(layer)
    return out


TOKEN_MAP, PRIMES = token_map(), primes()


def hash_ids(ids, live):
    """[S, n_engram_layers, n_cols] int64 rows, per-layer offsets included (as HF)."""
    S, pos = len(ids), np.arange(len(ids))
    comp = np.where(live, TOKEN_MAP[ids], -1)  # pads are DEAD
    pad = TOKEN_MAP[C["engram_pad_id"]]
    toks, blocked = [], np.zeros(S, bool)
    for s in range(C["engram_max_ngram_size"]):
        src = comp[np.maximum(pos - s, 0)]
        blocked = blocked | (pos < s) | (src == -1)
        toks.append(np.where(blocked, pad, src).astype(np.int64))
    bound = (np.iinfo(np.int64).max // (int(TOKEN_MAP.max()) + 1)) // 2
    out = []
    for li, layer in enumerate(C["engram_layer_ids"]):
        m = np.random.default_rng(10007 * layer).integers(0, bound, size=len(toks), dtype=np.int64)
        m = m * 2 + 1
        roll, cols, offset = toks[0] * m[0], [], 0
        for n in range(1, len(toks)):
            roll = roll ^ (toks[n] * m[n])
            for p in PRIMES[li][n - 1]:
                cols.append(roll % p + offset)
                offset += p
        out.append(np.stack(cols, -1))
    return np.stack(out, 1)


def rms(x, w=None):
    y = x * (1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)).astype(f32)
    return (y * w).astype(f32) if w is not None else y.astype(f32)


def sigmoid(x):
    return (1 / (1 + np.exp(-x))).astype(f32)


def lin(x, name):
    return (x @ W[name].T).astype(f32)


def pow2ceil(t):
    m, e = np.frexp(t.astype(f32))
    return np.where(m == 0.5, np.ldexp(f32(1), e - 1), np.ldexp(f32(1), e)).astype(f32)


def e4m3(x):
    """Round to float8_e4m3fn (nearest-even, subnormal step 2^-9); |x| <= 448 here."""
    a = np.abs(x).astype(np.float64)
    _, e = np.frexp(np.maximum(a, 1e-30))
    step = np.where(a >= 2.0 ** -6, np.ldexp(1.0, e - 4), 2.0 ** -9)
    return (np.sign(x) * np.rint(a / step) * step).astype(f32)


GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=f32)


def e2m1(q):
    """Nearest e2m1 magnitude; an exact tie goes to the even code (0.25, 1.25, 2.5, 5 down)."""
    dist = np.abs(np.abs(q)[..., None] - GRID)
    tie = (dist == dist.min(-1, keepdims=True)).sum(-1) > 1
    nearest = dist.argmin(-1)  # the lower code on a tie
    v = GRID[np.where(tie & (nearest % 2 == 1), nearest + 1, nearest)]
    return np.where(q < 0, -v, v).astype(f32)


def fq8(x):
    """Window KV: FP8 e4m3, blocks of 32, scale 2^ceil(log2(max(amax, 1e-4) * f32(1/448)))."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    s = pow2ceil(np.maximum(np.abs(b).max(-1), f32(1e-4)) * f32(1 / 448))[..., None]
    return (e4m3(np.clip(b / s, -448, 448)) * s).reshape(x.shape).astype(f32)


def fq4(x, block, e4m3_scale):
    """FP4 e2m1: compressed KV (16, E4M3 scale) or index q/k (32, UE8M0 scale)."""
    b = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(b).max(-1)
    if e4m3_scale:
        s = e4m3(np.maximum(amax, f32(6 * 2.0 ** -9)) / f32(6))
    else:
        s = pow2ceil(np.maximum(amax, f32(6 * 2.0 ** -126)) * f32(1 / 6))
    s = s[..., None]
    return (e2m1(np.clip(b / s, -6, 6)) * s).reshape(x.shape).astype(f32)


def inv_freq(kind):
    p = C["rope_parameters"][kind]
    base = f32(p["rope_theta"])
    pos_freqs = (base ** (np.arange(0, RD, 2, dtype=f32) / f32(RD))).astype(f32)
    if p["rope_type"] == "default":
        return (1.0 / pos_freqs).astype(f32)

    def corr(rot):
        return RD * math.log(p["original_max_position_embeddings"] / (rot * 2 * math.pi)) \
            / (2 * math.log(p["rope_theta"]))

    low = max(math.floor(corr(p["beta_fast"])), 0)
    high = min(math.ceil(corr(p["beta_slow"])), RD - 1)
    ramp = np.clip((np.arange(RD // 2, dtype=f32) - low) / f32(high - low), 0, 1).astype(f32)
    extra, inter = (1.0 / pos_freqs).astype(f32), (1.0 / (f32(p["factor"]) * pos_freqs)).astype(f32)
    return (inter * ramp + extra * (1 - ramp)).astype(f32)  # attention_factor 1: no mscale


INV = {k: inv_freq(k) for k in ("main", "compress")}


def rope(x, pos, kind, inverse=False):
    """Interleaved pairs (2i, 2i+1) of the last RD channels; inverse rotates by -angle."""
    ang = (pos.astype(f32)[:, None] * INV[kind][None]).astype(f32)
    c, s = np.cos(ang).astype(f32), np.sin(ang).astype(f32) * (-1 if inverse else 1)
    if x.ndim == 3:
        c, s = c[:, None], s[:, None]
    e, o = x[..., -RD::2], x[..., -RD + 1::2]
    rot = np.stack([e * c - o * s, e * s + o * c], -1).reshape(*x.shape[:-1], RD)
    return np.concatenate([x[..., :-RD], rot], -1).astype(f32)


def mixes(X, p, site):
    """mHC single-pass coefficients (pre, post, comb[j -> k]) from the streams X [S, hc, D]."""
    S = X.shape[0]
    mx = rms(X.reshape(S, -1)) @ W[p + f"hc_{site}_fn"].T
    sc, b = W[p + f"hc_{site}_scale"], W[p + f"hc_{site}_base"]
    pre = sigmoid(mx[:, :HC] * sc[0] + b[:HC]) + HC_EPS
    post = 2 * sigmoid(mx[:, HC:2 * HC] * sc[1] + b[HC:2 * HC])
    logits = (mx[:, 2 * HC:] * sc[2] + b[2 * HC:]).reshape(S, HC, HC)
    comb = np.exp(logits - logits.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + HC_EPS
    comb = comb / (comb.sum(-2, keepdims=True) + HC_EPS)
    for _ in range(C["hc_sinkhorn_iters"] - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + HC_EPS)
        comb = comb / (comb.sum(-2, keepdims=True) + HC_EPS)
    return pre.astype(f32), post.astype(f32), comb.astype(f32)


def expand(x, X, post, comb):
    return (post[..., None] * x[:, None] + np.einsum("sjk,sjd->skd", comb, X)).astype(f32)


def compress(h, p, r):
    """Latent of each complete group of r tokens (the trailing partial group is dropped)."""
    a = lin(h, p + "attn.compressor.wkv.weight")
    if r > 1:
        g = lin(h, p + "attn.compressor.wgate.weight")
        n = len(h) // r
        a, g = a[: n * r].reshape(n, r, -1), g[: n * r].reshape(n, r, -1)
        g = np.exp(g - g.max(1, keepdims=True))
        a = (a * g / g.sum(1, keepdims=True)).sum(1).astype(f32)
    return rms(a, W[p + "attn.compressor.norm.weight"])


def index(h, qres, p, r, pool_k, cands, is_cand, rec, i):
    """Index scores, the candidate mask (at the candidate source), and the top-k pick mask."""
    S, n, nh, ih = len(h), len(pool_k), C["index_n_heads"], C["index_head_dim"]
    pos = np.arange(S)
    q = lin(qres, p + "attn.indexer.wq_b.weight").reshape(S, nh, ih)
    q = fq4(rope(q, pos, "compress"), 32, False)
    score = np.maximum(np.einsum("shd,td->sht", q, pool_k), 0) * f32(ih ** -0.5)
    w = lin(h, p + "attn.indexer.weights_proj.weight") * f32(nh ** -0.5)
    score = (score * w[..., None]).sum(1)
    lens = (pos + 1) // r
    score = np.where(np.arange(n)[None] >= lens[:, None], -np.inf, score)
    if is_cand:
        bs, kb = C["candidate_block_size"], C["candidate_topk_blocks"]
        nb = -(-n // bs)
        padded = np.full((S, nb * bs), -np.inf, f32)
        padded[:, :n] = score
        blocks = padded.reshape(S, nb, bs).max(-1)
        blocks = np.where(np.arange(nb)[None] == ((lens - 1) // bs)[:, None], np.inf, blocks)
        keep = np.zeros((S, nb), bool)
        for t in range(S):
            top = np.argsort(-blocks[t], kind="stable")[:kb]
            keep[t, top] = blocks[t, top] > -np.inf
        cands = np.repeat(keep, bs, 1)[:, :n]
        rec[f"cand{i}"] = cands
    elif cands is not None:
        score = np.where(cands, score, -np.inf)
    picks, ids = np.zeros((S, n), bool), np.full((S, C["index_topk"]), -1)
    for t in range(S):
        top = np.argsort(-score[t], kind="stable")[: C["index_topk"]]
        top = top[score[t, top] > -np.inf]
        picks[t, top] = True
        ids[t, : len(top)] = np.sort(top)
    rec[f"topk{i}"] = ids
    return picks, cands


def moe(h, p, rec, i):
    s = np.sqrt(np.log1p(np.exp(lin(h, p + "ffn.gate.weight") / f32(C["gate_temp"])))).astype(f32)
    k = C["num_experts_per_tok"]
    idx = np.argsort(-(s + W[p + "ffn.gate.bias"]), -1, kind="stable")[:, :k]
    wts = np.take_along_axis(s, idx, 1)
    wts = wts / (wts.sum(-1, keepdims=True) + f32(1e-20)) * f32(C["routed_scaling_factor"])
    rec[f"experts{i}"] = np.sort(idx, -1), np.take_along_axis(wts, np.argsort(idx, -1), 1)
    lim = C["swiglu_limit"]

    def expert(x, name, wt=None):
        g = np.minimum(lin(x, name + ".w1.weight"), lim)
        u = np.clip(lin(x, name + ".w3.weight"), -lim, lim)
        y = g * sigmoid(g) * u
        return lin((y if wt is None else wt[:, None] * y).astype(f32), name + ".w2.weight")

    y = np.zeros_like(h)
    for e in range(C["n_routed_experts"]):
        tok, slot = np.nonzero(idx == e)
        if len(tok):
            y[tok] += expert(h[tok], p + f"ffn.experts.{e}", wts[tok, slot])
    return y + expert(h, p + "ffn.shared_experts")


def engram(X, p, rows):
    e = W[p + "engram.embed.weight"][rows].reshape(len(X), -1)
    kv = lin(e, p + "engram.wkv.weight")
    key, value = kv[:, : HC * DIM].reshape(-1, HC, DIM), kv[:, HC * DIM:]
    w = W[p + "engram.q_weight"] * W[p + "engram.k_weight"]
    rstd = (1 / np.sqrt((X * X).mean(-1) + EPS)) * (1 / np.sqrt((key * key).mean(-1) + EPS))
    dot = (X * w * key).sum(-1) * rstd * f32(DIM ** -0.5)
    gate = sigmoid(np.sign(dot) * np.sqrt(np.maximum(np.abs(dot), f32(1e-6))))
    return (X + gate[..., None] * value[:, None]).astype(f32)


def forward(ids, live, mode, rec):
    S, pos = len(ids), np.arange(len(ids))
    X = np.repeat(W["model.embed.weight"][ids][:, None], HC, 1).astype(f32)
    pre_mix = np.zeros((S, HC), f32)
    pre_mix[:, 0] = 1
    rows = rec["hash"] = hash_ids(ids, live)
    pool_kv = pool_k = picks = cands = None
    for i in range(C["num_hidden_layers"]):
        p, r = f"model.layers.{i}.", RATIOS[i]
        kind = "compress" if r else "main"
        if i in C["engram_layer_ids"]:
            X = engram(X, p, rows[:, C["engram_layer_ids"].index(i)])
        a_pre, a_post, a_comb = mixes(X, p, "attn")
        h = rms((pre_mix[..., None] * X).sum(1), W[p + "attn_norm.weight"])
        qres = rms(lin(h, p + "attn.wq_a.weight"), W[p + "attn.q_norm.weight"])
        q = rope(lin(qres, p + "attn.wq_b.weight").reshape(S, NH, HD), pos, kind)
        kv = rms(lin(h, p + "attn.wkv.weight"), W[p + "attn.kv_norm.weight"])
        kv = fq8(rope(kv, pos, kind))
        if i in KVS:
            lat = compress(h, p, r)
            cpos = np.arange(len(lat)) * r
            k = rms(lin(lat, p + "attn.indexer.wk.weight"), W[p + "attn.indexer.k_norm.weight"])
            k = fq4(rope(k, cpos, "compress"), 32, False)
            ckv = fq4(rope(lat, cpos, "compress"), 16, True)
            if mode == "pool" and pool_kv is not None:
                pool_kv, pool_k = np.concatenate([pool_kv, ckv]), np.concatenate([pool_k, k])
            else:
                pool_kv, pool_k = ckv, k
        if i in IXS:
            picks, cands = index(h, qres, p, r, pool_k, cands, i == CAND, rec, i)
        j = np.arange(S)
        window = (j[None] <= pos[:, None]) & (j[None] > pos[:, None] - C["sliding_window"]) & live
        z = np.where(window[:, None], np.einsum("shd,jd->shj", q, kv) * f32(HD ** -0.5), -np.inf)
        values = kv
        if r:
            zc = np.einsum("shd,jd->shj", q, pool_kv) * f32(HD ** -0.5)
            z = np.concatenate([z, np.where(picks[:, None], zc, -np.inf)], -1)
            values = np.concatenate([kv, pool_kv])
        sink = np.broadcast_to(W[p + "attn.attn_sink"][None, :, None], (S, NH, 1))
        z = np.concatenate([z, sink], -1)
        z = np.exp(z - z.max(-1, keepdims=True))
        prob = (z / z.sum(-1, keepdims=True))[..., :-1].astype(f32)
        o = rope(np.einsum("shj,jd->shd", prob, values).astype(f32), pos, kind, inverse=True)
        g = C["o_groups"]
        wo_a = W[p + "attn.wo_a.weight"].reshape(g, C["o_lora_rank"], -1)
        o = np.einsum("sgi,goi->sgo", o.reshape(S, g, -1), wo_a).reshape(S, -1).astype(f32)
        X = expand(lin(o, p + "attn.wo_b.weight"), X, a_post, a_comb)
        f_pre, f_post, f_comb = mixes(X, p, "ffn")
        h = rms((a_pre[..., None] * X).sum(1), W[p + "ffn_norm.weight"])
        X = rec[f"streams{i}"] = expand(moe(h, p, rec, i), X, f_post, f_comb)
        pre_mix = f_pre
    return lin(rms((pre_mix[..., None] * X).sum(1), W["model.norm.weight"]), "lm_head.weight")


def main():
    assert (TOKEN_MAP == R["engram.token_map"]).all()
    assert (np.array(PRIMES) == R["engram.primes"]).all()
    runs = (("pool", "logits", ""), ("per_source", "logits_use_cache", "use_cache."))
    for mode, key, prefix in runs:
        worst = 0.0
        for b in range(R["input_ids"].shape[0]):
            rec = {}
            logits = forward(R["input_ids"][b], R["attention_mask"][b].astype(bool), mode, rec)
            worst = max(worst, float(np.abs(logits - R[key][b]).max()))
            if prefix == "":
                assert (rec["hash"] == R["engram.hash_ids"][b]).all()
                for i in range(C["num_hidden_layers"]):
                    assert np.abs(rec[f"streams{i}"] - R[f"layers.{i}.out_streams"][b]).max() < 1e-4
            for i in IXS:
                assert (rec[f"topk{i}"] == R[f"{prefix}layers.{i}.indexer.topk_ids"][b]).all()
            cand = R[f"{prefix}layers.{CAND}.indexer.candidate_mask"][b].astype(bool)
            assert (rec[f"cand{CAND}"] == cand).all()
            for i in range(C["num_hidden_layers"]):
                ids, wts = rec[f"experts{i}"]
                assert (ids == R[f"{prefix}layers.{i}.ffn.expert_ids"][b]).all()
                assert np.abs(wts - R[f"{prefix}layers.{i}.ffn.routing_weights"][b]).max() < 1e-5
        print(f"{key:32s} mode={mode:10s} max|dlogit| = {worst:.2e}")
        assert worst < 1e-4


if __name__ == "__main__":
    main()
