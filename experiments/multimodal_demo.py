"""The embedded multimodal demo's picture: held-out examples of each task with the trained model's
answers -> docs/images/multimodal_demo.png.

    deepseek-jax train configs/train/tiny_multimodal.yaml
    python experiments/multimodal_demo.py [--run-dir runs/tiny_multimodal] [--per-task 8] [--out PNG]

Loads the run's latest checkpoint (with the run's own config.yaml), scores every held-out record as
the run's final evaluation does (exact_match.py: teacher-forced argmax = greedy answer), and draws the
first `--per-task` held-out records of each task in file order (no picking): the image, the audio's
log-mel spectrogram (what the audio front-end reads), the video's frames left to right, each titled
"answer -> model's answer", green when exactly right, red otherwise; the heading gives each task's
accuracy over all of its held-out records.
"""

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from deepseek_jax.config import load_config
from deepseek_jax.data.demo_media import PROMPTS
from deepseek_jax.exact_match import accuracy_by_tag
from deepseek_jax.media.audio import load_wav, log_mel
from deepseek_jax.run import load_trained

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("image", "audio", "video")


def _frames(path: Path) -> np.ndarray:
    """The GIF's frames side by side, a 1-pixel grey gap between them."""
    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.pad(np.asarray(im.convert("L")), ((0, 0), (0, 1)), constant_values=96))
    return np.concatenate(frames, axis=1)[:, :-1]


def _words(tokenizer, ids) -> str:
    ids = list(ids)
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids).replace("<|endoftext|>", "<eos>")


def _panel(ax, tag: str, record: dict, folder: Path, audio_cfg):
    media = folder / record["segments"][1][tag]
    if tag == "image":
        ax.imshow(np.asarray(Image.open(media).convert("L")), cmap="gray", vmin=0, vmax=255)
    elif tag == "audio":
        mel = log_mel(load_wav(media, str(media), audio_cfg.sample_rate), audio_cfg)
        ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma")
    else:
        ax.imshow(_frames(media), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def draw(session, results, per_task: int, out: Path, step: int) -> Path:
    tok, cfg = session.tokenizer, session.program.cfg
    by_name = {name: (rec, Path(folder)) for name, rec, folder in session.scorer.records}
    tags = [t for t in TAGS if any(r.tag == t for r in results)]
    heights = [0.45 if t == "video" else 1.0 for t in tags]  # a video row is a strip of frames
    fig, axes = plt.subplots(len(tags), per_task, figsize=(1.6 * per_task, 0.6 + 1.9 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    accuracy = accuracy_by_tag(results)
    for row, tag in zip(axes, tags):
        shown = [r for r in results if r.tag == tag][:per_task]
        for ax, r in zip(row, shown):
            record, folder = by_name[r.name]
            _panel(ax, tag, record, folder, cfg.model.audio)
            ax.set_title(f"{_words(tok, r.target)} → {_words(tok, r.predicted)}", fontsize=9,
                         color="tab:green" if r.exact else "tab:red")
        for ax in row[len(shown):]:
            ax.axis("off")
        n = sum(r.tag == tag for r in results)
        row[0].set_ylabel(f"{tag}\n{accuracy[f'accuracy/{tag}']:.1%} of {n}", fontsize=10)
    prompts = ", ".join(repr(PROMPTS[t]) for t in tags)
    fig.suptitle(f"held-out examples: answer → the model's answer (step {step}; prompts {prompts})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    plt.close(fig)
    with Image.open(buf) as im:  # a 128-colour palette: a third of the bytes, no visible change
        im.convert("RGB").quantize(128).save(out, optimize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/tiny_multimodal")
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "multimodal_demo.png"))
    ns = ap.parse_args()
    cfg = load_config([Path(ns.run_dir) / "config.yaml"], [f"train.run_dir={ns.run_dir}"])
    session, state = load_trained(cfg)
    if session.scorer is None:
        raise SystemExit(f"{ns.run_dir} is not a media run (its config has no data.media)")
    results = session.scorer(state.params, state.router)
    for k, v in accuracy_by_tag(results).items():
        print(f"{k} {v:.4f}")
    print(draw(session, results, ns.per_task, Path(ns.out), int(state.step)))


if __name__ == "__main__":
    main()
