"""Train the shipped recogniser (``recognizers.py``) on world renders; CPU, a few minutes.

    python -m fewstep.bench.judges.train_recognizers --out DIR [--steps N] [--seed S]
    fewstep bench train-recognizers ...

Why the data looks like this: a classifier trained on the few fixed backgrounds learns the
background, not the subject (measured: 2.6% identity accuracy). So every training render gets
a random background colour, half of them a random gradient, plus a random shift/zoom, optional
companion objects, styles, blur, noise and low resolution, so the network keys on the subject
and tolerates the blurry, grainy images a few-step generator makes.

Held out: scenes whose combination key is reserved for the mini benches
(``world.is_reserved(world.combo_key(attrs))``) never enter training; the reported accuracy is
on those renders, clean and degraded. The numbers are written to ``recognizer.json`` and quoted
in docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn
from tqdm import tqdm

from fewstep.bench import world
from fewstep.bench.judges.recognizers import ASSETS, RecognizerNet, label_sets, to_tensor

log = logging.getLogger(__name__)

SUBJECTS = [s.key for s in (*world.PORTRAIT, *world.LANDSCAPE)]
# A 64 px image pixelated to 4x4 blocks no longer shows which subject (or tone) it was.
UNRECOGNISABLE_STYLES = ("pixelate",)
IGNORE = -100


def random_attrs(rng: np.random.Generator, reserved: bool | None) -> dict:
    """A random portrait/landscape scene; ``reserved`` True/False keeps only (non-)bench combos."""
    for _ in range(1000):
        key = SUBJECTS[rng.integers(len(SUBJECTS))]
        sub = world.subject(key)
        category = "portrait" if key in {s.key for s in world.PORTRAIT} else "landscape"
        tone = None
        if sub.tones and rng.random() < 0.8:
            tone = world.SKIN_TONES[rng.integers(len(world.SKIN_TONES))]
        companion = None
        if rng.random() < 0.2:
            comp = world.COMPANIONS[rng.integers(len(world.COMPANIONS))]
            companion = {"subject": comp.key, "position": list(world.OPPOSITE)[rng.integers(4)]}
        attrs = world.make_attrs(
            category, subject=key, skin_tone=tone, companion=companion,
            background=world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))],
            position=world.POSITIONS[rng.integers(len(world.POSITIONS))],
            size=world.SIZES[rng.integers(2)], count=int(world.COUNTS[rng.integers(2)]))
        if reserved is None or world.is_reserved(world.combo_key(attrs)) == reserved:
            return attrs
    raise RuntimeError("could not draw a scene with the requested hold-out status")


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[None, :]
    t = np.broadcast_to(t, (size, size))[..., None]
    return a * (1 - t) + b * t


def augment(image: Image.Image, bg: tuple[int, int, int], rng: np.random.Generator, strength: float = 1.0
            ) -> Image.Image:
    """Random zoom/shift (filled with the background), blur, noise and low resolution."""
    res = image.width
    if rng.random() < 0.7 * strength:
        scale = rng.uniform(0.8, 1.2)
        dx, dy = rng.uniform(-0.12, 0.12, 2) * res
        # PIL's affine maps output -> input coordinates.
        inv = 1.0 / scale
        cx = res / 2
        coeffs = (inv, 0, cx - inv * (cx + dx), 0, inv, cx - inv * (cx + dy))
        image = image.transform((res, res), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                                fillcolor=bg)
    if rng.random() < 0.4 * strength:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.6)))
    if rng.random() < 0.15 * strength:
        small = max(8, int(res * rng.uniform(0.25, 0.6)))
        image = image.resize((small, small), Image.Resampling.BOX).resize((res, res), Image.Resampling.BILINEAR)
    if rng.random() < 0.5 * strength:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 25), (res, res, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def training_sample(rng: np.random.Generator, resolution: int = 64) -> tuple[Image.Image, dict[str, str]]:
    attrs = random_attrs(rng, reserved=False)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.75 else tuple(attrs["background_rgb"])
    attrs = {**attrs, "background_rgb": list(bg)}
    image = world.render_t2i(attrs, resolution)
    if rng.random() < 0.4:
        # Replace the flat background (pixels exactly equal to it) by a random gradient.
        array = np.asarray(image).astype(np.float64)
        mask = (array == np.array(bg)).all(-1)[..., None]
        array = np.where(mask, _gradient(rng, resolution), array)
        image = Image.fromarray(array.astype(np.uint8))
    style = "none"
    if rng.random() < 0.3:
        style = world.STYLES[rng.integers(len(world.STYLES))]
        image = world.apply_style(image, style)
    image = augment(image, bg, rng)
    return image, {"subject": attrs["subject"], "tone": attrs["skin_tone"] or "none", "style": style}


def heldout_set(n: int, seed: int, resolution: int = 64) -> tuple[list[Image.Image], list[dict[str, str]]]:
    """Clean renders of reserved (bench-only) combinations at the world's own backgrounds."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        attrs = random_attrs(rng, reserved=True)
        style = "none"
        image = world.render_t2i(attrs, resolution)
        if rng.random() < 0.3:
            style = world.STYLES[rng.integers(len(world.STYLES))]
            image = world.apply_style(image, style)
        images.append(image)
        labels.append({"subject": attrs["subject"], "tone": attrs["skin_tone"] or "none", "style": style})
    return images, labels


def degrade_for_eval(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.filter(ImageFilter.GaussianBlur(radius=1.0))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (image.height, image.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@torch.no_grad()
def accuracy(net: nn.Module, images: list[Image.Image], labels: list[dict[str, str]],
             names: dict[str, list[str]]) -> dict[str, float]:
    net.eval()
    out = {k: [] for k in names}
    for start in range(0, len(images), 256):
        logits = net(to_tensor(images[start:start + 256]))
        for k in names:
            out[k].append(logits[k].argmax(1))
    result = {}
    for k, classes in names.items():
        pred = torch.cat(out[k]).tolist()
        truth = [classes.index(lab[k]) for lab in labels]
        # Tone only over subjects that have tones (others are trivially "none"); subject and tone
        # not on pixelated images (unrecognisable by construction).
        keep = [i for i, lab in enumerate(labels) if (k != "tone" or world.subject(lab["subject"]).tones)
                and (k == "style" or lab["style"] not in UNRECOGNISABLE_STYLES)]
        result[k] = round(sum(pred[i] == truth[i] for i in keep) / max(1, len(keep)), 4)
        if k == "subject":
            plain = [i for i in keep if labels[i]["style"] == "none"]
            result["subject_unstyled"] = round(sum(pred[i] == truth[i] for i in plain) / max(1, len(plain)), 4)
    return result


def sample_pool(n: int, seed: int, resolution: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` augmented training renders as one uint8 tensor, with their labels as class indices."""
    rng = np.random.default_rng(seed)
    names = label_sets()
    images = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    labels = {k: np.zeros(n, dtype=np.int64) for k in names}
    for i in tqdm(range(n), desc="render training set", unit="img"):
        image, lab = training_sample(rng, resolution)
        images[i] = np.asarray(image)
        for k in names:
            labels[k][i] = names[k].index(lab[k])
        if lab["style"] in UNRECOGNISABLE_STYLES:
            labels["subject"][i] = labels["tone"][i] = IGNORE
    return torch.from_numpy(images), {k: torch.from_numpy(v) for k, v in labels.items()}


def check_renderer() -> None:
    """Refuse to train on wrong renders: Pillow without raqm draws skin-tone and ZWJ emoji
    ("man cook: dark skin tone") as several glyphs side by side, and the network would learn them."""
    single = world._emoji_glyph(world.emoji_of("man"))
    sequence = world._emoji_glyph(world.emoji_of("man_cook", "dark"))
    if sequence.width > 1.5 * single.width:
        raise RuntimeError("this Pillow renders emoji sequences as separate glyphs (no raqm text shaping); "
                           "install a Pillow built with libraqm (the PyPI wheels are) before training")


def train(out_dir: Path, steps: int = 9000, batch_size: int = 64, seed: int = 0, width: int = 48,
          lr: float = 3e-3, pool: int = 45000, eval_size: int = 1000, threads: int = 2,
          device: str = "cpu") -> dict:
    """Render a pool of augmented samples once, then train over it with extra noise/flip jitter.

    Rendering every step costs more than the network (PIL, 4 ms a sample), hence the pool.
    """
    check_renderer()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    names = label_sets()
    start = time.time()
    pool_images, pool_labels = sample_pool(pool, seed)
    render_s = time.time() - start
    net = RecognizerNet({k: len(v) for k, v in names.items()}, width=width).to(device)
    pool_labels = {k: v.to(device) for k, v in pool_labels.items()}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="train recogniser", unit="step")
    for _step in bar:
        net.train()
        idx = torch.randint(0, pool, (batch_size,), generator=gen)
        x = pool_images[idx].to(device).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1.0
        flip = (torch.rand(batch_size, generator=gen) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        jitter = torch.randn(x.shape, generator=gen) * (torch.rand(batch_size, 1, 1, 1, generator=gen) * 0.08)
        out = net(x + jitter.to(device))
        loss = sum(loss_fn(out[k], pool_labels[k][idx.to(device)]) for k in names)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.time() - start
    net = net.cpu()

    images, labels = heldout_set(eval_size, seed + 1)
    erng = np.random.default_rng(seed + 2)
    clean = accuracy(net, images, labels, names)
    degraded = accuracy(net, [degrade_for_eval(im, erng) for im in images], labels, names)
    card = {
        "labels": names, "width": width, "input_size": 64, "world_version": world.WORLD_VERSION,
        "vocabulary_hash": world.vocabulary_hash(),
        "train": {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "pool": pool,
                  "render_seconds": round(render_s, 1), "seconds": round(train_s, 1), "threads": threads,
                  "device": device, "torch": torch.__version__},
        "heldout": {"n": eval_size, "what": "renders of bench-reserved combinations (never trained on)",
                    "clean": clean, "blur1_noise12": degraded},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "recognizer.safetensors"))
    (out_dir / "recognizer.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("held-out accuracy clean %s, blurred+noisy %s (%.0f s)", clean, degraded, train_s)
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help=f"where to write the weights and card ({ASSETS} replaces the shipped ones)")
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=45000, help="augmented renders drawn once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda); the recipe is the same")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    card = train(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, pool=args.pool,
                 threads=args.threads, width=args.width, eval_size=args.eval_size, device=args.device)
    print(json.dumps(card["heldout"], indent=2))


if __name__ == "__main__":
    main()
