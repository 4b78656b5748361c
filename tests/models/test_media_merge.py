"""Media merged into the decoder's embeddings (models/media.py; the contract in media/slots.py).

- MediaEmbed: each span position gets what its slot says (IMAGE / AUDIO: the feature row `rows` names,
  computed here by the towers run on their own; START / NEWLINE / END, video and audio delimiters: the
  learned vectors; FRAME: video_frame[f]); text positions keep their token embedding bit for bit;
  swapping two images' pixels swaps only their positions' embeddings; a one-modality model leaves
  the other modality's slots as x.
- Decoder: media=None on a model with media front-ends is bit-identical to the text-only model; the
  merged embeddings are MediaEmbed's; perturbing a later image leaves earlier logits alone; one
  compile serves two batches of the same budgets; bad media give a ValueError naming the field.
- V4.1 (slow): span_BT = slots >= 0 selects the router's bias_vl.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.layers.audio import AudioFrontEnd
from deepseek_jax.layers.vision import Aligner, VisionTower
from deepseek_jax.media import slots as S
from deepseek_jax.models import build_model, init_inputs
from deepseek_jax.models.media import MediaEmbed
from tests.layers import media_numpy as ref
from tests.models.test_v41 import V41_THREE
from tests.utils import CONFIGS, assert_close

IMG, VID, AUD = 250, 251, 252
MEDIA = ["model." + o for o in (
    "vision.hidden_size=32", "vision.num_heads=2", "vision.intermediate_size=32", "vision.num_layers=2",
    "vision.patch_size=2", "vision.downsample_ratio=3", f"vision.image_token_id={IMG}", "vision.min_pixels=64",
    "vision.max_image_tokens=32", f"video.video_token_id={VID}", "video.max_frames=4",
    f"audio.audio_token_id={AUD}", "audio.n_mels=8", "audio.conv_channels=16")]
T, P, M, A, F = 48, 40, 8, 2, 9  # per-row budgets: positions, patches, aligner rows, clips, frames


def cfg_of(name="tiny", media=True, extra=()):
    return load_model_config([CONFIGS / "model" / f"{name}.yaml"], (MEDIA if media else []) + list(extra))


def build_batch(cfg, rows: list[list[tuple]], seed=0):
    """Token ids and MediaInputs (numpy) for rows of items ("text", n) | ("image", h, w) (ViT grid) |
    ("video", h, w, frames) | ("audio", frames), laid out as media/slots.py says, padded with text."""
    rng, r, B = np.random.default_rng(seed), cfg.vision.downsample_ratio, len(rows)
    tokens = rng.integers(1, 200, (B, T)).astype(np.int32)
    slots, rowids = np.full((B, T), -1, np.int32), np.zeros((B, T), np.int32)
    mel = rng.standard_normal((B, A, F, cfg.audio.n_mels)).astype(np.float32)
    mel_len, pic = np.zeros((B, A), np.int32), np.full((B, P), -1, np.int32)
    pos, where, n_tok = np.zeros((B, P, 2), np.int32), [], cfg.audio.n_tokens(F)
    for b, items in enumerate(rows):
        t, m, o, clip = 0, 0, 0, 0

        def put(code, row=0, tok=None):
            nonlocal t
            slots[b, t], rowids[b, t], tokens[b, t] = code, row, tok
            t += 1

        def picture(h, w, tok):
            nonlocal m, o
            pos[b, o : o + h * w] = np.stack(np.divmod(np.arange(h * w), w), -1)
            pic[b, o : o + h * w] = len([x for x in where if x[0] == b])
            where.append((b, o, h, w))
            lh, lw = -(-h // r), -(-w // r)
            for i in range(lh):
                for j in range(lw):
                    put(S.IMAGE, m + i * lw + j, tok)
                put(S.NEWLINE, 0, tok)
            m, o = m + lh * lw, o + h * w

        for kind, *args in items:
            if kind == "text":
                t += args[0]
            elif kind == "image":
                put(S.IMAGE_START, 0, IMG), picture(*args, IMG), put(S.IMAGE_END, 0, IMG)
            elif kind == "video":
                put(S.VIDEO_START, 0, VID)
                for f in range(args[2]):
                    put(S.FRAME, f, VID), picture(args[0], args[1], VID)
                put(S.VIDEO_END, 0, VID)
            else:
                mel_len[b, clip] = args[0]
                put(S.AUDIO_START, 0, AUD)
                for j in range(cfg.audio.n_tokens(args[0])):
                    put(S.AUDIO, M + clip * n_tok + j, AUD)
                put(S.AUDIO_END, 0, AUD)
                clip += 1
        assert t <= T and o <= P and m <= M
    unshuffle, _ = ref.unshuffle_indices(where, r, M, B)
    patches = rng.standard_normal((B, P, cfg.vision.patch_dim)).astype(np.float32)
    return tokens, S.MediaInputs(slots, rowids, patches, pos, pic, unshuffle, mel, mel_len), where


ROWS = [[("text", 3), ("image", 4, 5), ("text", 2), ("audio", 9), ("text", 1), ("image", 3, 3)],
        [("text", 2), ("video", 2, 4, 3), ("text", 1), ("audio", 5), ("audio", 2)]]


@pytest.fixture(scope="module")
def embed_setup():
    cfg = cfg_of()
    tokens, media, where = build_batch(cfg, ROWS)
    x = np.random.default_rng(5).standard_normal((2, T, cfg.dim)).astype(np.float32)
    module = MediaEmbed(cfg)
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x, media))["params"]
    params = ref.randomize(params, np.random.default_rng(6))
    return cfg, module, params, x, media, where


def test_each_slot_gets_what_the_contract_says(embed_setup):
    cfg, module, params, x, media, _ = embed_setup
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(module.apply)({"params": params}, x, media))
        feats = VisionTower(cfg.vision).apply({"params": params["vision"]}, media.patches, media.patch_pos,
                                              media.patch_pic)
        feats = Aligner(cfg.vision, cfg.dim).apply({"params": params["aligner"]}, feats, media.unshuffle)
        audio = AudioFrontEnd(cfg.audio, cfg.dim).apply({"params": params["audio"]}, media.mel, media.mel_len)
    feats = np.concatenate([np.asarray(feats), np.asarray(audio).reshape(2, -1, cfg.dim)], axis=1)
    delimiters = {S.IMAGE_START: "image_start", S.NEWLINE: "image_newline", S.IMAGE_END: "image_end",
                  S.VIDEO_START: "video_start", S.VIDEO_END: "video_end", S.AUDIO_START: "audio_start",
                  S.AUDIO_END: "audio_end"}
    seen = set()
    for b, t in np.ndindex(2, T):
        code, row = int(media.slots[b, t]), int(media.rows[b, t])
        seen.add(code)
        if code == S.TEXT:
            np.testing.assert_array_equal(got[b, t], x[b, t])
        elif code in delimiters:
            np.testing.assert_array_equal(got[b, t], params[delimiters[code]])
        elif code == S.FRAME:
            np.testing.assert_array_equal(got[b, t], params["video_frame"][row])
        else:
            assert_close(got[b, t], feats[b, row], rtol=1e-6, atol=1e-6, what=f"slot {code} at ({b}, {t})")
    assert seen == set(range(-1, S.N_SLOTS))  # every slot code was exercised


@pytest.mark.parametrize("lacks, drop", [("audio", ("mel", "mel_len")),
                                         ("vision", ("patches", "patch_pos", "patch_pic", "unshuffle"))])
def test_slots_of_a_modality_the_model_lacks_keep_x(lacks, drop):
    """A one-modality model: the other modality's slots (features and delimiters) keep x bit for bit,
    never reading the present modality's feature rows; its own slots are still merged."""
    gone = {"audio": ["model.audio=null"], "vision": ["model.vision=null", "model.video=null"]}[lacks]
    cfg, (_, media, _) = cfg_of(extra=gone), build_batch(cfg_of(), ROWS)
    media = media._replace(**dict.fromkeys(drop))
    x = np.random.default_rng(5).standard_normal((2, T, cfg.dim)).astype(np.float32)
    module = MediaEmbed(cfg)
    got = np.asarray(jax.jit(module.apply)(jax.jit(module.init)(jax.random.key(0), x, media), x, media))
    audio = np.isin(media.slots, [S.AUDIO_START, S.AUDIO, S.AUDIO_END])
    lacking = audio if lacks == "audio" else (media.slots >= 0) & ~audio
    np.testing.assert_array_equal(got[lacking | (media.slots == S.TEXT)], x[lacking | (media.slots == S.TEXT)])
    present = (media.slots >= 0) & ~lacking
    assert present.any() and not np.isclose(got[present], x[present]).all(axis=-1).any()


def test_swapping_two_images_swaps_only_their_embeddings(embed_setup):
    cfg, module, params, x, media, where = embed_setup
    rows = [[("text", 2), ("image", 3, 4), ("text", 3), ("image", 3, 4), ("audio", 6)], [("text", 40)]]
    tokens, media, where = build_batch(cfg, rows, seed=3)
    (_, o1, h, w), (_, o2, _, _) = where
    one, two = slice(o1, o1 + h * w), slice(o2, o2 + h * w)
    swapped = media.patches.copy()
    swapped[0, one], swapped[0, two] = media.patches[0, two], media.patches[0, one]
    apply = jax.jit(module.apply)
    got = np.asarray(apply({"params": params}, x, media))
    got2 = np.asarray(apply({"params": params}, x, media._replace(patches=swapped)))
    image = np.flatnonzero(media.slots[0] == S.IMAGE)
    first, second = image[: len(image) // 2], image[len(image) // 2 :]
    assert_close(got2[0, first], got[0, second], rtol=1e-6, atol=1e-6, what="image 1 after the swap")
    assert_close(got2[0, second], got[0, first], rtol=1e-6, atol=1e-6, what="image 2 after the swap")
    assert not np.allclose(got[0, first], got[0, second], atol=1e-3)
    others = np.ones((2, T), bool)
    others[0, image] = False
    np.testing.assert_array_equal(got2[others], got[others])


@pytest.fixture(scope="module")
def decoder_setup():
    cfg = cfg_of()
    model = build_model(cfg)
    tokens, kw = init_inputs(cfg)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, **kw))
    media_params = ref.randomize(variables["params"]["media"], np.random.default_rng(7))
    variables = {**variables, "params": {**variables["params"], "media": media_params}}
    return cfg, model, variables


def logits_fn(model, traces=None):
    def fwd(variables, tokens, media):
        if traces is not None:
            traces.append(1)  # runs once per trace (compile), not per call
        return model.apply(variables, tokens, media=media, mtp=False).logits

    return jax.jit(fwd)


def test_init_inputs_create_every_media_parameter(decoder_setup):
    cfg, model, variables = decoder_setup
    tokens, media, _ = build_batch(cfg, ROWS)
    full = jax.eval_shape(model.init, jax.random.key(0), tokens, media=media)
    assert jax.tree.structure(nn.unbox(full["params"])) == jax.tree.structure(variables["params"])
    assert sorted(variables["params"]["media"]) == [
        "aligner", "audio", "audio_end", "audio_start", "image_end", "image_newline", "image_start", "video_end",
        "video_frame", "video_start", "vision"]
    boxed = jax.eval_shape(model.init, jax.random.key(0), *init_inputs(cfg)[:1], **init_inputs(cfg)[1])
    names = boxed["params"]["media"]["vision"]["blocks"]["attn"]["w_qkv"].names
    assert names == ("layers", "embed", None, "heads", "head_dim")
    assert "media" not in init_inputs(cfg_of(media=False))[1]


def test_text_only_calls_are_bit_identical_to_the_text_model(decoder_setup):
    cfg, model, variables = decoder_setup
    text_model = build_model(cfg_of(media=False))
    text_vars = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "media"}}
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)
    got = jax.jit(lambda v, t: model.apply(v, t).logits)(variables, tokens)
    want = jax.jit(lambda v, t: text_model.apply(v, t).logits)(text_vars, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decoder_merges_with_media_embed_and_stays_causal(decoder_setup):
    cfg, model, variables = decoder_setup
    tokens, media, where = build_batch(cfg, ROWS)

    @jax.jit
    def fwd(variables, media):  # logits and the embeddings MediaEmbed handed on
        out, state = model.apply(variables, tokens, media=media, mtp=False,
                                 capture_intermediates=lambda mdl, _: isinstance(mdl, MediaEmbed))
        return out.logits, state["intermediates"]["media"]["__call__"][0]

    (got, merged), (got2, _) = [fwd(variables, m) for m in (media, perturb_last_image(media, where))]
    x = jnp.take(variables["params"]["embedding"], tokens, axis=0)
    want = jax.jit(MediaEmbed(cfg).apply)({"params": variables["params"]["media"]}, x, media)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(want))
    got, got2 = np.asarray(got), np.asarray(got2)
    start = int(np.flatnonzero(media.slots[0] == S.IMAGE_START)[1])  # row 0's second (last) image
    np.testing.assert_array_equal(got2[0, :start], got[0, :start])
    np.testing.assert_array_equal(got2[1], got[1])
    assert not np.allclose(got2[0, start:], got[0, start:], atol=1e-4)


def perturb_last_image(media, where):
    b, o, h, w = where[1]  # row 0's second image
    noisy = media.patches.copy()
    noisy[b, o : o + h * w] += 1.0
    return media._replace(patches=noisy)


def test_one_compile_serves_two_batches_of_the_same_budgets(decoder_setup):
    cfg, model, variables = decoder_setup
    traces = []
    fwd = logits_fn(model, traces)
    other = [[("audio", 3), ("image", 6, 6)], [("image", 1, 2), ("video", 1, 1, 4), ("text", 5), ("image", 2, 2)]]
    outs = [fwd(variables, *build_batch(cfg, rows, seed)[:2]) for rows, seed in ((ROWS, 0), (other, 1))]
    assert len(traces) == 1 and all(np.isfinite(np.asarray(o)).all() for o in outs)


@pytest.mark.parametrize("change, message", [
    (lambda m: m._replace(slots=m.slots[:, :-1]), "media.slots"),
    (lambda m: m._replace(rows=m.rows.astype(np.float32)), "media.rows"),
    (lambda m: m._replace(patch_pic=None), "media.patch_pic is None"),
    (lambda m: m._replace(patch_pos=m.patch_pos[:, :-1]), "media.patch_pos"),
    (lambda m: m._replace(unshuffle=m.unshuffle[..., :4]), "media.unshuffle"),
    (lambda m: m._replace(mel=m.mel[..., :3]), "media.mel"),
    (lambda m: m._replace(mel_len=m.mel_len[:, :1]), "media.mel_len"),
])
def test_bad_media_name_the_field(decoder_setup, change, message):
    cfg, model, _ = decoder_setup
    tokens, media, _ = build_batch(cfg, ROWS)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), tokens, media=change(media))


def test_media_the_model_lacks_are_refused():
    tokens, media, _ = build_batch(cfg_of(), ROWS)
    audio_only = build_model(cfg_of(extra=["model.vision=null", "model.video=null"]))
    with pytest.raises(ValueError, match="no vision .* media.patches must be None"):
        jax.eval_shape(audio_only.init, jax.random.key(0), tokens, media=media)
    with pytest.raises(ValueError, match="no media front-end"):
        jax.eval_shape(build_model(cfg_of(media=False)).init, jax.random.key(0), tokens, media=media)


@pytest.mark.slow
def test_v41_span_selects_bias_vl():
    """tiny_v41 (moe.vl_bias; 3 layers) + the reference §5 vision: with media, span_BT defaults to slots >= 0;
    a changed bias_vl moves the logits of span positions and after, never before the first span, and
    nothing at all when span_BT is passed all False."""
    cfg = cfg_of("tiny_v41", extra=V41_THREE)  # 3 layers: bias_vl selects in each MoE layer alike
    assert cfg.moe.vl_bias
    model = build_model(cfg)
    tokens, media, _ = build_batch(cfg, ROWS)
    engram_rows = np.zeros((2, T, *cfg.engram.rows_shape), np.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, engram_rows=engram_rows, media=media))
    rng = np.random.default_rng(8)
    moved = {**variables, "router": jax.tree_util.tree_map_with_path(
        lambda path, a: a + 3.0 * rng.standard_normal(a.shape).astype(a.dtype) if path[-1].key == "bias_vl" else a,
        variables["router"])}

    @jax.jit
    def fwd(variables, span_BT):
        return model.apply(variables, tokens, engram_rows=engram_rows, media=media, span_BT=span_BT, mtp=False).logits

    default = jax.jit(lambda v: model.apply(v, tokens, engram_rows=engram_rows, media=media, mtp=False).logits)
    span = media.slots >= 0
    base, vl = np.asarray(fwd(variables, span)), np.asarray(fwd(moved, span))
    np.testing.assert_array_equal(np.asarray(default(variables)), base)
    first = int(np.flatnonzero(span[0])[0])
    np.testing.assert_array_equal(vl[0, :first], base[0, :first])
    assert not np.allclose(vl[0, first:], base[0, first:], atol=1e-4)
    no_span = np.zeros_like(span)
    np.testing.assert_array_equal(np.asarray(fwd(moved, no_span)), np.asarray(fwd(variables, no_span)))
