"""Generation from images, audio and video (deepseek_jax/generate_media.py, the CLI's --image / --audio /
--video): greedy decoding after a media prefill equals, at every step, the argmax of a full forward pass
(no cache) over the prompt and the tokens generated so far with the same media, so the cache holds the
media positions; the same with Engram hashed around the spans and with speculative (DSpark) decoding;
errors name the file or the flag; the text path is unchanged.

Models: configs/model/tiny_multimodal.yaml (vision, video, audio) and, for Engram and DSpark,
configs/model/tiny_v41.yaml with the same three front-ends at vocab 64, both with random variables filled
from the declared shapes (no init compile)."""

import dataclasses
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from deepseek_jax import cli
from deepseek_jax import generate as gen
from deepseek_jax import generate_media as gm
from deepseek_jax.config import load_model_config
from deepseek_jax.engram_hash import compressed_vocab, engram_layout, hash_rows
from deepseek_jax.generate_media import encode_prompt, generate_media, media_record, sample_media
from deepseek_jax.media import AUDIO, FRAME, IMAGE, TEXT
from deepseek_jax.media.audio import load_wav
from deepseek_jax.media.image import load_image, preprocess_image
from deepseek_jax.media.video import load_video, preprocess_video
from deepseek_jax.models import build_model, init_inputs
from deepseek_jax.tokenizer import DataError, Tokenizer
from tests.utils import CONFIGS, TOL, assert_close, wav_bytes, whitespace_words

MM = CONFIGS / "model/tiny_multimodal.yaml"
WORDS = ["which", "digit", "?", "tones", "way", "and", "then", "left", "right"]
IMG, VID, AUD = 61, 62, 63  # tiny_multimodal's placeholder ids
N_NEW = 6


# ----------------------------------------------------------------------------------------------
# fixtures: a tokenizer of exactly 64 ids, media files, models with random variables


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = {"<|endoftext|>": 0, "<pad>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)},
             "<image>": IMG, "<video>": VID, "<audio>": AUD}
    vocab |= {f"<unused_{i}>": i for i in sorted(set(range(64)) - set(vocab.values()))}
    tok = whitespace_words(vocab)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(path)


def tone_wav(seconds: float, rate: int = 8000, freq: float = 1000.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return wav_bytes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16), rate)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """a.png, b.png (24×24 RGB), s.wav (0.3 s at 8 kHz), v.gif (3 frames of 0.5 s: all kept at 2 fps),
    and corrupt bad.png / bad.wav / bad.gif."""
    d, rng = tmp_path_factory.mktemp("media"), np.random.default_rng(0)
    picture = lambda: Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))  # noqa: E731
    picture().save(d / "a.png")
    picture().save(d / "b.png")
    frames = [picture() for _ in range(3)]
    frames[0].save(d / "v.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    (d / "s.wav").write_bytes(tone_wav(0.3))
    for name in ("bad.png", "bad.wav", "bad.gif"):
        (d / name).write_bytes(b"not a media file at all")
    return d


def random_variables(model, seed: int = 0):
    """Variables of the declared shapes (media front-ends included; no init compile): norm scales 1
    (mHC's 0.01), biases and sinks 0, embeddings N(0, 1), other weights N(0, 1/fan-in), fan-in the
    first axis that is not a stacking one (layers, experts)."""
    tokens, kwargs = init_inputs(model.cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        value, last = getattr(leaf, "value", leaf), name.rsplit("/", 1)[-1]
        names = getattr(leaf, "names", (None,) * len(value.shape))
        if last in ("scale", "bias", "bias_vl", "base", "sink"):
            return np.full(value.shape, {"scale": 0.01 if "_hc/" in name else 1.0}.get(last, 0.0), np.float32)
        dims = [n for n, a in zip(value.shape, names) if a not in ("layers", "experts")] or [1]
        std = 1.0 if last in ("embedding", "markov_embed") else dims[0] ** -0.5
        return (std * rng.standard_normal(value.shape)).astype(np.float32)

    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.device_put(jax.tree_util.tree_map_with_path(fill, {c: boxed[c] for c in boxed}, is_leaf=is_boxed))


@pytest.fixture(scope="module")
def mm_cfg():
    return load_model_config([MM])


@pytest.fixture(scope="module")
def mm(mm_cfg):
    model = build_model(mm_cfg)
    return model, random_variables(model)


@pytest.fixture(scope="module")
def v41_cfg(mm_cfg):
    """tiny_v41 (Engram, DSpark, shared KV, window 32) at vocab 64 with tiny_multimodal's front-ends."""
    cfg = load_model_config([CONFIGS / "model/tiny_v41.yaml"])
    return dataclasses.replace(cfg, vocab_size=64, vision=mm_cfg.vision, video=mm_cfg.video, audio=mm_cfg.audio,
                               engram=dataclasses.replace(cfg.engram, compressed_vocab_size=64))


@pytest.fixture(scope="module")
def v41(v41_cfg):
    model = build_model(v41_cfg)
    return model, random_variables(model)


# ----------------------------------------------------------------------------------------------
# the reference: full forward passes without a cache


def reference_greedy(model, variables, tokens_1P, media, n: int, cmap=None, margin: float = 1e-3):
    """Greedy tokens from full forwards (no cache): step i runs the prompt and the i tokens before it
    (right-padded to P + n - 1 positions, text slots; causal, so the padding is never read), with the
    prompt's media and, with Engram, rows hashed over the whole sequence with the spans dead. Also
    the prompt's last logits; asserts each step's top-2 margin exceeds `margin` (no near-ties)."""
    cfg, P = model.cfg, tokens_1P.shape[1]
    W = P + n - 1
    pad = lambda a, v: np.pad(np.asarray(a), ((0, 0), (0, W - P)), constant_values=v)  # noqa: E731
    full = None if media is None else media._replace(slots=pad(media.slots, TEXT), rows=pad(media.rows, 0))
    dead_1W = np.zeros((1, W), bool) if media is None else np.asarray(full.slots) >= 0

    @jax.jit
    def forward(variables, tokens_1W, rows, media):
        return model.apply(variables, tokens_1W, mtp=False, media=media, engram_rows=rows).logits[0]

    ids, first = list(tokens_1P[0]), None
    for _ in range(n):
        tokens_1W = np.asarray([ids + [0] * (W - len(ids))], np.int32)
        rows = None if cfg.engram is None else hash_rows(engram_layout(cfg.engram), cmap, tokens_1W, dead_BT=dead_1W)
        logits_V = np.asarray(forward(variables, tokens_1W, rows, full)[len(ids) - 1])
        top2 = np.sort(logits_V)[-2:]
        assert top2[1] - top2[0] > margin, f"near-tie at step {len(ids) - P}: margin {top2[1] - top2[0]:.2e}"
        first = logits_V if first is None else first
        ids.append(int(np.argmax(logits_V)))
    return ids[P:], first


def prefill_logits(model, variables, tokens_1P, media):
    """The cached path's prompt logits (generate._prefill with the media, one chunk)."""
    cache = gen.build_cache(model.cfg, 1, tokens_1P.shape[1] + N_NEW)
    return np.asarray(gen._prefill(model, variables, tokens_1P, None, cache, None, None, media)[0][0])


PROMPTS = {  # name -> record (media paths relative to media_dir)
    "image": media_record("which digit ?", [("image", "a.png")]),
    "audio": media_record("which tones ?", [("audio", "s.wav")]),
    "video": media_record("which way ?", [("video", "v.gif")]),
    "mix": {"segments": [{"text": "which digit"}, {"image": "a.png"}, {"text": "and"}, {"audio": "s.wav"},
                         {"video": "v.gif"}, {"image": "b.png"}, {"text": "then ?"}]},
}


# ----------------------------------------------------------------------------------------------
# (1), (2): greedy with media = full-forward argmax at every step


@pytest.mark.slow  # ~10-20 s per prompt on 2 cores (three compiles: prefill, step, forward)
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_with_media_equals_full_forward_argmax(mm, tokenizer, media_dir, name):
    model, variables = mm
    tokens_1P, media = encode_prompt(model.cfg, tokenizer, PROMPTS[name], media_dir)
    with jax.default_matmul_precision("highest"):
        got = generate_media(model, variables, tokens_1P, media, N_NEW, eos_id=-1)
        want, want_logits = reference_greedy(model, variables, tokens_1P, media, N_NEW)
        got_logits = prefill_logits(model, variables, tokens_1P, media)
        no_media_logits = np.asarray(jax.jit(lambda v, t: model.apply(v, t, mtp=False).logits)(variables, tokens_1P))
    assert got == want and len(got) == N_NEW
    assert_close(got_logits, want_logits, **TOL["model_f32"], what=f"{name}: prefill logits vs full forward")
    # the media matter: the placeholders' own embeddings give other logits (the spans were replaced)
    assert np.abs(no_media_logits[0, -1] - want_logits).max() > 1e-2


@pytest.mark.slow  # ~70 s: tiny_v41's prefill, step, verification and draft compiles
def test_engram_and_speculative_decoding_with_media(v41, tokenizer, media_dir, monkeypatch):
    """tiny_v41: the prefill's Engram rows are the whole prompt's hashed with the spans dead (numpy
    hash_rows), its logits the full forward's; the prompt is longer than the 32-slot window;
    greedy = the full-forward reference at every step; speculative decoding returns the same tokens."""
    model, variables = v41
    tokens_1P, media = encode_prompt(model.cfg, tokenizer, PROMPTS["mix"], media_dir)
    cmap, layout, n = compressed_vocab(tokenizer), engram_layout(model.cfg.engram), 10
    assert tokens_1P.shape[1] > model.cfg.v4.window_size
    seen = []

    def spy(*args):
        out = prefill(*args)
        seen.append((np.asarray(args[6]), np.asarray(out[0][0])))  # (engram rows, prompt logits)
        return out

    prefill = gm._prefill
    monkeypatch.setattr(gm, "_prefill", spy)
    with jax.default_matmul_precision("highest"):
        got = generate_media(model, variables, tokens_1P, media, n, eos_id=-1, engram_map=cmap)
        want, want_logits = reference_greedy(model, variables, tokens_1P, media, n, cmap)
        stats = {}
        spec = generate_media(model, variables, tokens_1P, media, n, eos_id=-1, engram_map=cmap, speculative=True,
                              stats=stats)
    rows, logits = seen[0]
    dead_1P = np.asarray(media.slots) >= 0
    np.testing.assert_array_equal(rows, hash_rows(layout, cmap, tokens_1P, dead_BT=dead_1P))
    assert (rows != hash_rows(layout, cmap, tokens_1P)).any()  # the dead spans change the rows after them
    assert_close(logits, want_logits, **TOL["model_f32"], what="tiny_v41 prefill logits vs full forward")
    assert got == want and spec == want
    assert stats["steps"] >= 1 and stats["drafted"] == stats["steps"] * model.cfg.dspark.block_size


# ----------------------------------------------------------------------------------------------
# (4) the text path


@pytest.mark.slow  # ~10 s
def test_text_only_prompts_take_the_text_path(mm, tokenizer):
    """No media: sample_media = sample (generate's text path) = the full-forward reference."""
    model, variables = mm
    with jax.default_matmul_precision("highest"):
        via_media = sample_media(model, variables, tokenizer, "which digit ?", max_new_tokens=N_NEW)
        via_text = gen.sample(model, variables, tokenizer, ["which digit ?"], N_NEW)[0]
        tokens_1P = np.asarray([tokenizer.encode("which digit ?")], np.int32)
        want, _ = reference_greedy(model, variables, tokens_1P, None, N_NEW, margin=0.0)
    want = want[: want.index(tokenizer.eos_id)] if tokenizer.eos_id in want else want
    assert via_media == via_text == tokenizer.decode(want)


# ----------------------------------------------------------------------------------------------
# prompts: encoding (fast)


def test_a_prompt_is_its_media_in_order_then_its_text(mm_cfg, tokenizer, media_dir):
    """media_record keeps the given order; encode_prompt appends no end-of-text, sizes every budget
    exactly to the prompt (no padding patch, aligner row or mel frame), and leaves the fields of an
    unused front-end None."""
    record = media_record("which way ?", [("audio", "s.wav"), ("image", "a.png"), ("video", "v.gif")])
    assert [next(iter(s)) for s in record["segments"]] == ["audio", "image", "video", "text"]
    tokens_1P, media = encode_prompt(mm_cfg, tokenizer, record, media_dir)
    slots = np.asarray(media.slots[0])
    kinds = [int(t) for t, s in zip(tokens_1P[0], slots) if s >= 0]
    first = {k: kinds.index(k) for k in (AUD, IMG, VID)}
    assert first[AUD] < first[IMG] < first[VID]
    assert list(tokens_1P[0, -3:]) == tokenizer.encode("which way ?") and (slots[-3:] == TEXT).all()
    image, _ = preprocess_image(load_image(media_dir / "a.png", "a"), mm_cfg.vision)
    frames = preprocess_video(load_video(media_dir / "v.gif", "v", mm_cfg.video), mm_cfg.video,
                              mm_cfg.vision)
    assert (slots == FRAME).sum() == len(frames) == 3  # 3 frames of 0.5 s at 2 fps
    assert media.patches.shape[:2] == (1, len(image) + sum(len(p) for p, _ in frames))
    assert (np.asarray(media.patch_pic) >= 0).all() and media.unshuffle.shape[1] == (slots == IMAGE).sum()
    samples = len(load_wav(media_dir / "s.wav", "s", mm_cfg.audio.sample_rate))
    n_frames = 1 + samples // mm_cfg.audio.hop_length  # centred STFT
    assert media.mel.shape[:3] == (1, 1, n_frames) and int(media.mel_len[0, 0]) == n_frames
    assert (slots == AUDIO).sum() == mm_cfg.audio.n_tokens(n_frames)
    _, audio_only = encode_prompt(mm_cfg, tokenizer, media_record("?", [("audio", "s.wav")]), media_dir)
    assert audio_only.patches is None and audio_only.unshuffle is None and audio_only.mel is not None
    assert encode_prompt(mm_cfg, tokenizer, media_record("which digit ?"), media_dir)[1] is None


def test_markers_place_media_inside_the_prompt():
    """<image> / <audio> / <video> take the next medium of their kind in flag order; unplaced media lead."""
    media = [("image", "a.png"), ("audio", "s.wav"), ("image", "b.png"), ("video", "v.gif")]
    record = media_record("which digit ?<image> and <video>", media)
    assert record["segments"] == [{"audio": "s.wav"}, {"image": "b.png"}, {"text": "which digit ?"},
                                  {"image": "a.png"}, {"text": " and "}, {"video": "v.gif"}]
    assert media_record("<audio>", [("audio", "s.wav")])["segments"] == [{"audio": "s.wav"}]
    with pytest.raises(DataError, match="more <image> markers than --image files"):
        media_record("<image><image>", [("image", "a.png")])


# ----------------------------------------------------------------------------------------------
# (3) errors (fast: no model call)


@pytest.mark.parametrize("kind, path, what", [
    ("image", "missing.png", "image file .*missing.png does not exist"),
    ("audio", "missing.wav", "audio file .*missing.wav does not exist"),
    ("video", "missing.gif", "video file .*missing.gif does not exist"),
    ("image", "bad.png", "cannot decode image .*bad.png"),
    ("audio", "bad.wav", "cannot decode audio .*bad.wav"),
    ("video", "bad.gif", "cannot decode video .*bad.gif"),
])
def test_bad_media_files_are_data_errors_naming_the_file(mm_cfg, tokenizer, media_dir, kind, path, what):
    with pytest.raises(DataError, match=what):
        encode_prompt(mm_cfg, tokenizer, media_record("which digit ?", [(kind, path)]), media_dir)


@pytest.mark.parametrize("kind, drop", [("audio", {"audio": None}), ("video", {"video": None}),
                                        ("image", {"vision": None, "video": None})])
def test_a_modality_the_model_lacks_names_the_flag(mm_cfg, tokenizer, media_dir, kind, drop):
    cfg = dataclasses.replace(mm_cfg, **drop)
    field = "vision" if kind == "image" else kind
    with pytest.raises(DataError, match=f"{kind} input \\(--{kind}\\) given but the model has no model.{field}"):
        encode_prompt(cfg, tokenizer, media_record("?", [("image", "a.png"), (kind, "x")]), media_dir)
    with pytest.raises(DataError, match="media kind 'picture'"):
        media_record("?", [("picture", "a.png")])


def test_generate_media_refuses_what_it_cannot_do(mm, tokenizer, media_dir):
    model, variables = mm
    tokens_1P, media = encode_prompt(model.cfg, tokenizer, PROMPTS["image"], media_dir)
    with pytest.raises(ValueError, match="exceed model.max_seq_len"):
        generate_media(model, variables, tokens_1P, media, model.cfg.max_seq_len, eos_id=0)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        generate_media(model, variables, np.zeros((2, 3), np.int32), None, 1, eos_id=0)
    with pytest.raises(ValueError, match="greedy only"):
        generate_media(model, variables, tokens_1P, media, 2, eos_id=0, temperature=1.0, speculative=True)
    with pytest.raises(ValueError, match="either in the record or as images"):
        sample_media(model, variables, tokenizer, PROMPTS["image"], images=["a.png"])


def test_speculative_generate_refuses_ragged_prompts_with_media(v41_cfg, tokenizer, media_dir):
    """Prompts of different lengths run one at a time, text only: with media a clear ValueError (not
    numpy's ragged-array error), before any model call (so no variables are needed)."""
    tokens_1P, media = encode_prompt(v41_cfg, tokenizer, PROMPTS["image"], media_dir)
    prompts = [tokens_1P[0].tolist(), tokens_1P[0, :-1].tolist()]
    with pytest.raises(ValueError, match="with media takes prompts of one length"):
        gen.speculative_generate(build_model(v41_cfg), None, prompts, 2, eos_id=0, media=media)


# ----------------------------------------------------------------------------------------------
# CLI: flags in order, errors as one line


def test_cli_media_flags_keep_their_order():
    ns = cli._parser().parse_intermixed_args(
        ["generate", "c.yaml", "--audio", "s.wav", "--prompt", "p", "--image", "a.png", "--video", "v.gif",
         "--image", "b.png", "k=v"])
    assert ns.media == [("audio", "s.wav"), ("image", "a.png"), ("video", "v.gif"), ("image", "b.png")]
    assert ns.args == ["c.yaml", "k=v"] and ns.prompt == ["p"]


@pytest.fixture
def cli_session(mm, tokenizer, monkeypatch):
    """cli._load patched to the tiny multimodal model (no checkpoint on disk)."""
    model, variables = mm
    session = SimpleNamespace(program=SimpleNamespace(model=model), tokenizer=tokenizer)
    state = SimpleNamespace(params=variables["params"], router=variables.get("router", {}))
    monkeypatch.setattr(cli, "_load", lambda cfg, checkpoint: (session, state))
    return model


TRAIN_MM = str(CONFIGS / "train/tiny_multimodal.yaml")


@pytest.mark.parametrize("argv, what", [
    (["--image", "{d}/missing.png"], "--image {d}/missing.png: no such file"),
    (["--audio", "{d}/bad.wav"], "cannot decode audio {d}/bad.wav"),
    (["--image", "{d}/bad.png"], "cannot decode image {d}/bad.png"),
    (["--audio", "{d}/s.wav", "model.audio=null"], "audio input (--audio) given but the model has no model.audio"),
])
def test_cli_errors_are_one_line_naming_the_file_or_flag(cli_session, media_dir, capsys, argv, what):
    argv = [a.format(d=media_dir) for a in argv]
    assert cli.main(["generate", TRAIN_MM, "--prompt", "which digit ?", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and what.format(d=media_dir) in err and err.count("\n") == 1, err


@pytest.mark.slow  # ~10 s: the image prompt's compiles (shared with the greedy test via the persistent cache)
def test_cli_generates_from_media(cli_session, mm, tokenizer, media_dir, capsys):
    model, variables = mm
    argv = ["generate", TRAIN_MM, "--image", str(media_dir / "a.png"), "--prompt", "which digit ?",
            "--max-new-tokens", str(N_NEW)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    want = sample_media(model, variables, tokenizer, "which digit ?", images=[media_dir / "a.png"],
                        max_new_tokens=N_NEW)
    assert out.startswith(f"--- --image {media_dir / 'a.png'} 'which digit ?'\n") and out.endswith(f"{want}\n")
