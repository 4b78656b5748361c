"""Writes the DeepSeek-V4.1 vision-language parity fixture in this folder.

Run once, by hand, in the side environment of tests/golden/v41 (its generate_fixture.py docstring builds
it: python 3.11, torch 2.13 CPU, transformers 5.25.0 + the text-only `deepseek_v41` model files @0a2080b4),
extended with:

    /tmp/v41side/venv/bin/pip install pillow==13.0.0 scikit-image==0.26.0 scikit-learn==1.9.1 \
        matplotlib==3.11.2
    # copy src/transformers/models/deepseek_v41/{image_processing_pil_deepseek_v41,
    # image_processing_deepseek_v41,processing_deepseek_v41}.py @a290b39f (read with the code index's
    # read_file; SHA256 below pins the copies) into .../site-packages/transformers/models/deepseek_v41/
    /tmp/v41side/venv/bin/python tests/golden/v41_vision/generate_fixture.py [--search N]

torchvision is not installed (its wheel here does not load with the CPU torch): the processing module
imports only the kwargs TypedDict from the torchvision image-processor module, and that class is
textually identical in the PIL module, so `sys.modules` points the import at the PIL module.

transformers' vision-language model revision is not available, so the reference is three-part (NOTES.md):
- HF's own processor @a290b39f: every image -> pixel_values, image_grid_thw; prompts -> input_ids;
- vision_reference.py (float64 numpy, from the architecture notes): ViT, 2D RoPE, aligner, merge;
- HF's text model @0a2080b4 (tests/golden/v41's weights, sha256-pinned, not copied) given the merged
  embeddings by a forward hook on `model.embed`, Engram hashed with DEAD = pad or image span, the Engram
  gate shut on those positions, and each MoE gate given `image_mask` = the span (that revision has the
  `bias_vl` parameter and the gate argument but its layer never passes it).
The logits come from its cache path (one prefill through the hand-built CSA cache; the no-cache path
accumulates the pool, tests/golden/v41/NOTES.md), QAT on (`logits`) and off (`noqat.logits`).
`--search N` tries N vision-init / prompt seeds and prints margins and fake-quant boundary distances;
the chosen seeds are SEEDS below.
"""

import datetime
import hashlib
import importlib.metadata as md
import importlib.resources
import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
V41 = HERE.parent / "v41"
sys.path[:0] = [str(HERE), str(V41)]  # run by path: the helpers here and tests/golden/v41's
import vision_reference as VR  # noqa: E402
from vision_checks import Glue, IndexerMargins, RouterRecorder, check_floors  # noqa: E402


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G41 = _load("v41_generate_fixture", V41 / "generate_fixture.py")  # config, tokenizer words, CSA cache
import fixture_checks as FC  # noqa: E402 - tests/golden/v41

VL_COMMIT = "a290b39fcc1e4e8f9b548f98dd8c02ff9070984f"
VL_SHA256 = {
    "image_processing_pil_deepseek_v41.py": "fe35183eeb87b6034ad2ad26aa353b6811f7e7647b011c86e585698bca1336c3",
    "image_processing_deepseek_v41.py": "fb88e3ae66c75d9b8c1c3779914322feac11390cd0eeb98c6eae446b1e212240",
    "processing_deepseek_v41.py": "987cc93c553be0516a91325ea3ab782defd0cb8935cb2adf6daccf529dbecb9a",
}
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<\uff5cdeepseek_image\uff5c>", 249  # id 249 is "wo" in the v41 vocabulary
VISION = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 2,
          "patch_size": 2, "downsample_ratio": 3, "rope_theta": 10000.0, "min_pixels": 64,
          "max_image_tokens": 32, "max_wh_ratio": None}
REF_CFG = {"layers": 2, "heads": 2, "theta": 10000.0, "eps": 1e-6}  # vision_reference.vit's
TINY = {"patch_size": 2, "downsample_ratio": 3, "min_pixels": 64, "max_image_tokens": 32}  # processor kwargs
SEEDS = {"vision_init": 269, "prompt": 269, "small_image": 16012}  # 269: `--search 300`, NOTES.md
D, R = 64, 3
SAMPLES = {  # name -> (package, file): images shipped inside installed packages
    "astronaut": ("skimage.data", "astronaut.png"), "chelsea": ("skimage.data", "chelsea.png"),
    "coffee": ("skimage.data", "coffee.png"), "camera": ("skimage.data", "camera.png"),
    "logo": ("skimage.data", "logo.png"), "china": ("sklearn.datasets", "images/china.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
MODEL_IMAGES = [["astronaut", "small"], ["chelsea"]]  # per batch row, in prompt order


def side_env():
    """HF's modules: the text model (sha-checked by the v41 generator) and the processor copies."""
    M = G41.check_side_env()
    folder = Path(M.__file__).parent
    got = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in VL_SHA256}
    assert got == VL_SHA256, f"the processor files differ from the copies: {got}"
    from transformers.models.deepseek_v41 import image_processing_pil_deepseek_v41 as P

    sys.modules["transformers.models.deepseek_v41.image_processing_deepseek_v41"] = P  # kwargs TypedDict only
    from transformers.models.deepseek_v41 import processing_deepseek_v41 as PR

    return M, P, PR


def sample_path(name) -> Path:
    package, file = SAMPLES[name]
    return Path(str(importlib.resources.files(package).joinpath(file)))


def images() -> dict:
    """PIL images: the package samples as files decode, plus synthetic ones (stored as uint8 arrays)."""
    from PIL import Image

    out = {n: Image.open(sample_path(n)) for n in SAMPLES}
    for im in out.values():
        im.load()
    rng = np.random.default_rng(SEEDS["small_image"])
    small = (rng.integers(0, 256, (12, 16, 3)) * np.linspace(0.4, 1, 16)[None, :, None]).astype(np.uint8)
    astro = np.asarray(out["astronaut"])
    synthetic = {
        "small": small,  # 16×12 -> 6×8 patches -> 2×3 LLM grid (width padded 8 -> 9)
        "tiny_5x3": astro[200:203, 250:255],  # below min_pixels: upscaled
        "wide_512x10": astro[100:110],  # tiny budget: one LLM row
        "tall_10x512": astro[:, 100:110],  # tiny budget: one LLM column
        "wide_300x40": astro[300:340, 100:400],  # with max_wh_ratio 2: squeezed
    }
    out.update({n: Image.fromarray(np.ascontiguousarray(a)) for n, a in synthetic.items()})
    return out, synthetic


def build_tokenizer():
    """The v41 fixture's 256 words with id 249 ("wo", a word no other id normalises to) replaced by the
    image placeholder, added as a regular (not special) token so it always encodes to one id."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, vocab = G41.build_tokenizer()
    assert vocab[IMAGE_TOKEN_ID] == "wo"
    vocab = vocab[:IMAGE_TOKEN_ID] + [IMAGE_TOKEN] + vocab[IMAGE_TOKEN_ID + 1:]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(G41.SPECIALS)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=False, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    assert len(hf) == 256 and hf.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    return tok, hf, vocab


def processor_cases(P, PR, hf_tok, ims, words):
    """HF's PIL image processor on every sample at the released and the tiny settings (plus the squeeze
    path and per-call budget overrides), and the processor's prompt expansion."""
    released, tiny = P.DeepseekV41ImageProcessorPil(), P.DeepseekV41ImageProcessorPil(**TINY)
    runs = [("released", released, {}, list(ims)), ("tiny", tiny, {}, list(ims)),
            ("tiny_max_wh_ratio_2", tiny, {"max_wh_ratio": 2}, ["wide_300x40", "wide_512x10", "coffee"]),
            ("released_max_image_tokens_64_min_pixels_1", released, {"max_image_tokens": 64, "min_pixels": 1},
             ["chelsea", "grace_hopper", "tiny_5x3"])]
    cases, arrays = [], {}
    for setting, proc, kwargs, names in runs:
        for name in names:
            for kind in ("pil", "array") if name in ("camera", "logo") else ("pil",):
                image = ims[name] if kind == "pil" else np.asarray(ims[name])
                out = proc(images=[image], return_tensors="np", **kwargs)
                pv, grid = out["pixel_values"], out["image_grid_thw"]
                assert pv.dtype == np.float32 and grid.shape == (1, 3)
                key = f"{setting}.{name}.{kind}"
                case = {"key": key, "setting": setting, "kwargs": kwargs, "image": name, "input": kind,
                        "grid": [int(grid[0, 1]), int(grid[0, 2])], "shape": list(pv.shape),
                        "sha256": hashlib.sha256(np.ascontiguousarray(pv).tobytes()).hexdigest(),
                        "sum": float(pv.astype(np.float64).sum())}
                if setting != "released" and not setting.startswith("released_"):
                    arrays[f"pixel_values.{key}"] = torch.from_numpy(np.ascontiguousarray(pv))
                cases.append(case)
    # prompt expansion: adjacent placeholders, placeholder first / last, two rows, padding
    proc = PR.DeepseekV41Processor(image_processor=tiny, tokenizer=hf_tok, image_token=IMAGE_TOKEN)
    prompts = [f"{IMAGE_TOKEN}{IMAGE_TOKEN} {words[3]} {words[7]} {IMAGE_TOKEN}",
               f"{words[1]} {IMAGE_TOKEN} {words[2]}"]
    pics = [["small", "tall_10x512", "tiny_5x3"], ["wide_512x10"]]
    out = proc(text=prompts, images=[[ims[n] for n in row] for row in pics], padding=True, return_tensors="np")
    prompt = {"text": prompts, "images": pics, "grids": out["image_grid_thw"][:, 1:].tolist(),
              "unexpanded_ids": [hf_tok.encode(p, add_special_tokens=False) for p in prompts]}
    arrays["prompt.input_ids"] = torch.from_numpy(out["input_ids"])
    arrays["prompt.attention_mask"] = torch.from_numpy(out["attention_mask"])
    return cases, arrays, prompt


def plain_words(vocab, hf_tok):
    """Vocabulary words that encode to their own id alone (no whitespace, not special, not the image)."""
    return [w for w in vocab[5:] if w and w.strip() == w and " " not in w and w != IMAGE_TOKEN
            and hf_tok.encode(w, add_special_tokens=False) == [vocab.index(w)]]


def init_vision(seed: int) -> tuple[dict, dict]:
    """Vision tower, aligner and delimiters (official names), every tensor from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    W, F, C = VISION["hidden_size"], VISION["intermediate_size"], 3 * VISION["patch_size"] ** 2

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    spec = [("vision.patch_embed.proj.weight", (W, C)), ("vision.patch_embed.proj.bias", (W,))]
    for b in range(VISION["num_hidden_layers"]):
        p = f"vision.blocks.{b}."
        spec += [(p + "norm1.weight", (W,)), (p + "attn.wqkv.weight", (3 * W, W)), (p + "attn.wqkv.bias", (3 * W,)),
                 (p + "attn.wo.weight", (W, W)), (p + "attn.wo.bias", (W,)), (p + "norm2.weight", (W,)),
                 (p + "mlp.w1.weight", (2 * F, W)), (p + "mlp.w2.weight", (W, F))]
    spec += [("vision.norm.weight", (W,)), ("aligner.w1.weight", (D, W * R * R)), ("aligner.w1.bias", (D,)),
             ("aligner.w2.weight", (D, D)), ("aligner.w2.bias", (D,)),
             ("image_start", (D,)), ("image_newline", (D,)), ("image_end", (D,))]
    weights, rules = {}, {}
    for name, shape in spec:
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "vision.norm.weight":
            weights[name], rules[name] = normal(shape, 0.1, 1.0), "1+N(0,0.1)"
        elif name.startswith("image_"):
            weights[name], rules[name] = normal(shape, 1.0), "N(0,1) (as the token embedding)"
        elif name.endswith(".bias"):
            weights[name], rules[name] = normal(shape, 0.1), "N(0,0.1)"
        else:
            weights[name], rules[name] = normal(shape, shape[1] ** -0.5), "N(0,1/fan_in)"
    return weights, rules


def prompts(words, seed):
    """Two rows: text, image, text, image, text (57 positions) and text, image, text (54, then 3 pads)."""
    rng = np.random.default_rng(seed)

    def text(n):
        return " ".join(rng.choice(words, size=n))
    return [f"<s> {text(4)} {IMAGE_TOKEN} {text(4)} {IMAGE_TOKEN} {text(6)}",
            f"<s> {text(5)} {IMAGE_TOKEN} {text(18)}"]


def model_inputs(PR, P, hf_tok, ims, words, seed):
    proc = PR.DeepseekV41Processor(image_processor=P.DeepseekV41ImageProcessorPil(**TINY), tokenizer=hf_tok,
                                   image_token=IMAGE_TOKEN)
    text = prompts(words, seed)
    out = proc(text=text, images=[[ims[n] for n in row] for row in MODEL_IMAGES], padding=True,
               return_tensors="np")
    return text, {k: np.asarray(v) for k, v in out.items()}


def vision_features(inputs, vw):
    """Per image (in order): float64 ViT output and aligner rows; per row: slots and merged rows."""
    pv, grids = inputs["pixel_values"], [tuple(int(x) for x in g[1:]) for g in inputs["image_grid_thw"]]
    vits, rows, start = [], [], 0
    for grid in grids:
        n = grid[0] * grid[1]
        vits.append(VR.vit(pv[start:start + n], grid, vw, REF_CFG))
        rows.append(VR.aligner(vits[-1], grid, vw, R))
        start += n
    assert start == len(pv)
    return grids, vits, rows


def merged_embeddings(model, inputs, grids, rows, vw):
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.model.embed(torch.from_numpy(ids)).double().numpy()
    slots, merged, k = [], [], 0
    for b, pics in enumerate(MODEL_IMAGES):
        g = grids[k:k + len(pics)]
        s = VR.span_slots(ids[b], g, IMAGE_TOKEN_ID, R)
        merged.append(VR.merge(embeds[b], s, np.concatenate(rows[k:k + len(pics)]), vw))
        slots.append(s)
        k += len(pics)
    return np.stack(slots), np.stack(merged).astype(np.float32)


def forward(model, M, config, hf_tok, inputs, embeds, span, rec, tag, keep=False, prefix=""):
    """One prefill through the CSA cache with the VL glue installed; fresh n-gram history."""
    model.model.bind_tokenizer(hf_tok)
    ids, mask = (torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask"))
    glue = Glue(model, torch.from_numpy(embeds), torch.from_numpy(span), mask.bool())
    for r in rec:
        r.on, r.tag, r.keep, r.prefix = True, tag, keep, prefix
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=True,
                       past_key_values=G41.csa_cache(M, config)).logits.float()
    finally:
        glue.remove()
        for r in rec:
            r.on = r.keep = False
    return logits, glue


def trial(model, M, config, hf_tok, PR, P, ims, words, vision_seed, prompt_seed, rec):
    vw, rules = init_vision(vision_seed)
    text, inputs = model_inputs(PR, P, hf_tok, ims, words, prompt_seed)
    grids, vits, rows = vision_features(inputs, {k: v.numpy() for k, v in vw.items()})
    slots, embeds = merged_embeddings(model, inputs, grids, rows, {k: v.numpy() for k, v in vw.items()})
    span = slots >= 0
    with torch.no_grad():
        qat, glue = forward(model, M, config, hf_tok, inputs, embeds, span, rec, "use_cache", True, "")
        with FC.patched_fake_quant(M, FC.no_fake_quant):
            noqat, _ = forward(model, M, config, hf_tok, inputs, embeds, span, rec, "noqat", True, "noqat.")
        probe = FC.QuantProbe(model)
        with FC.patched_fake_quant(M, probe.wrap):
            probed, _ = forward(model, M, config, hf_tok, inputs, embeds, span, [], "probe")
        probe.remove()
    assert torch.equal(probed, qat), "the recording wrapper changed the QAT run"
    return dict(vw=vw, rules=rules, text=text, inputs=inputs, grids=grids, vits=vits, rows=rows, slots=slots,
                embeds=embeds, qat=qat, noqat=noqat, hash_ids=glue.hash_ids, boundaries=probe.report())


def boundary_floor(report) -> float:
    return min(s[w]["min"]["rel"] for s in report.values() for w in ("value", "scale") if w in s)


def setup():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    M, P, PR = side_env()
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok, hf_tok, vocab = build_tokenizer()
    token_map, n_compressed = M.build_compressed_token_map(hf_tok)
    v41_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(V41 / "tokenizer.json")))
    assert (token_map, n_compressed) == M.build_compressed_token_map(v41_tok), "token map differs from v41's"
    config = M.DeepseekV41TextConfig(**G41.config_kwargs(n_compressed))
    model = M.DeepseekV41ForCausalLM(config).eval()
    model.load_state_dict(load_file(V41 / "weights.safetensors"), strict=True)
    ims, synthetic = images()
    rec = [RouterRecorder(model), IndexerMargins(model, M, 2, None)]
    return dict(M=M, P=P, PR=PR, tok=tok, hf_tok=hf_tok, vocab=vocab, config=config, model=model, ims=ims,
                synthetic=synthetic, rec=rec, token_map=token_map, words=plain_words(vocab, hf_tok))


def run_trial(env, vision_seed, prompt_seed):
    for r in env["rec"]:
        r.reset()
    return trial(env["model"], env["M"], env["config"], env["hf_tok"], env["PR"], env["P"], env["ims"],
                 env["words"], vision_seed, prompt_seed, env["rec"])


def search(n):
    env = setup()
    for s in range(n):
        t = run_trial(env, s, s)
        live = torch.from_numpy(t["inputs"]["attention_mask"]).bool()
        router, indexer = env["rec"]
        print(s, router.summary(live), indexer.summary(), f"boundary {boundary_floor(t['boundaries']):.2e}",
              flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def composite_config(v41_config: dict) -> dict:
    """config.json: tests/golden/v41's text config + the tiny vision_config + image_token_id (the composite
    DeepseekV41Config layout of @a290b39f)."""
    return {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "text_config": v41_config,
            "vision_config": {"model_type": "deepseek_v41_vision", **VISION}, "image_token_id": IMAGE_TOKEN_ID}


def reference_tensors(t, env) -> dict:
    router, indexer = env["rec"]
    ref = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t["inputs"].items()}
    ref.update({"slots": torch.from_numpy(t["slots"]), "inputs_embeds": torch.from_numpy(t["embeds"]),
                "logits": t["qat"], "noqat.logits": t["noqat"],
                "vision.out": torch.from_numpy(np.concatenate(t["vits"]).astype(np.float32)),
                "aligner.out": torch.from_numpy(np.concatenate(t["rows"]).astype(np.float32)),
                "engram.hash_ids": torch.stack([t["hash_ids"][i] for i in sorted(t["hash_ids"])], dim=2),
                "images.small": torch.from_numpy(env["synthetic"]["small"])})
    ref.update(router.out)
    ref.update(indexer.out)
    return {k: v.detach().contiguous() for k, v in ref.items()}


def main():
    from safetensors.torch import save_file

    env = setup()
    hf_tok = env["hf_tok"]
    t = run_trial(env, SEEDS["vision_init"], SEEDS["prompt"])
    router, indexer = env["rec"]
    live = torch.from_numpy(t["inputs"]["attention_mask"]).bool()
    margins = check_floors(router, indexer, live)  # every router / indexer / block margin > 1e-4
    span = torch.from_numpy(t["slots"] >= 0)
    again = run_trial(env, SEEDS["vision_init"], SEEDS["prompt"])
    assert torch.equal(again["qat"], t["qat"]) and torch.equal(again["noqat"], t["noqat"]), "not deterministic"
    assert torch.isfinite(t["qat"]).all() and torch.isfinite(t["noqat"]).all()
    cases, arrays, prompt = processor_cases(env["P"], env["PR"], hf_tok, env["ims"], env["words"])
    arrays.update({f"images.{n}": torch.from_numpy(np.array(a)) for n, a in env["synthetic"].items()})

    vw = {"model." + k: v.contiguous() for k, v in t["vw"].items()}
    save_file(vw, HERE / "weights.safetensors", metadata={"layout": "hf_text (model. + official names)"})
    save_file(reference_tensors(t, env), HERE / "reference.safetensors", metadata={"hf_commit": G41.HF_COMMIT})
    save_file(arrays, HERE / "processor.safetensors", metadata={"hf_commit": VL_COMMIT})
    env["tok"].save(str(HERE / "tokenizer.json"))
    v41_config = json.loads((V41 / "config.json").read_text())
    (HERE / "config.json").write_text(json.dumps(composite_config(v41_config), indent=2, sort_keys=True) + "\n")
    decoded = {n: hashlib.sha256(np.asarray(im).tobytes()).hexdigest() for n, im in env["ims"].items()}
    (HERE / "processor.json").write_text(json.dumps({
        "hf_commit": VL_COMMIT, "settings": {"released": {}, "tiny": TINY}, "image_token": IMAGE_TOKEN,
        "image_token_id": IMAGE_TOKEN_ID, "samples": {n: {"package": p, "file": f, "sha256": sha256(sample_path(n))}
                                                    for n, (p, f) in SAMPLES.items()},
        "decoded_sha256": decoded, "cases": cases, "prompt": prompt}, indent=1, ensure_ascii=False) + "\n")
    diff = [float((t["qat"][b] - t["noqat"][b])[live[b]].abs().max()) for b in range(2)]
    moved = {tag: {i: int(v) for i, v in per.items()} for tag, per in router.vl_moves.items()}
    n_span = int(span.sum())
    meta = {
        "source": {"repo": "huggingface/transformers", "text_model_commit": G41.HF_COMMIT,
                   "text_model_files_sha256": G41.SHA256, "processor_commit": VL_COMMIT,
                   "processor_files_sha256": VL_SHA256, "path": "src/transformers/models/deepseek_v41/",
                   "text_weights": "tests/golden/v41/weights.safetensors",
                   "text_weights_sha256": sha256(V41 / "weights.safetensors"),
                   "text_tokenizer_sha256": sha256(V41 / "tokenizer.json")},
        "versions": {p: md.version(p) for p in ("transformers", "torch", "numpy", "tokenizers", "safetensors",
                                                 "pillow", "scikit-image", "scikit-learn", "matplotlib")}
        | {"python": platform.python_version()},
        "torchvision": "not installed; processing_deepseek_v41's import of the kwargs TypedDict is pointed at "
                       "the PIL module (textually identical class)",
        "seeds": SEEDS, "vision": VISION, "vision_init_rules": t["rules"],
        "run": {"path": "use_cache=True, one prefill through the hand-built CSA cache (tests/golden/v41)",
                "dtype": "float32", "torch_threads": 1, "batch": 2, "seq_len": int(t["qat"].shape[1]),
                "prompts": t["text"], "images_per_row": MODEL_IMAGES,
                "grids": [list(g) for g in t["grids"]], "span_positions": n_span,
                "pads": int((~live).sum()), "qat_minus_noqat_max_abs_per_row_live": diff,
                "selection_differs_noqat_vs_qat": {k: int((router.out[k] != router.out["noqat." + k])
                                                           .any(-1)[live].sum())
                                                   for k in router.out if k.endswith("expert_ids")
                                                   and not k.startswith("noqat.")}},
        "margins": margins, "indexer_n_entries": {t_: {k: v for k, v in m.items() if k.endswith("n_entries")}
                                                  for t_, m in indexer.margins.items()},
        "bias_vl_moves_tokens_per_layer": moved,
        "fake_quant_boundaries": {"about": "as tests/golden/v41/meta.json (pads included)", **t["boundaries"]},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (HERE / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print("margins", router.summary(live), indexer.summary(), "boundary", boundary_floor(t["boundaries"]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--search":
        search(int(sys.argv[2]))
    else:
        main()
