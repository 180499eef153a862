"""Small CNN recognisers trained on world renders, shipped in ``fewstep/bench/assets``.

One network, three heads: ``subject`` (every portrait and landscape subject of
``fewstep.bench.world``), ``tone`` (no skin tone or one of the five) and ``style`` (none or one
of the five style-edit looks). It sees the whole image resized to 64x64, so it works for any
input size. Weights: ``assets/recognizer.safetensors``; labels, world version and the held-out
accuracy measured at training time: ``assets/recognizer.json``. Train (CPU, a few minutes):
``fewstep bench train-recognizers`` or ``python -m fewstep.bench.judges.train_recognizers``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "recognizer.safetensors"
CARD = ASSETS / "recognizer.json"
INPUT_SIZE = 64


def label_sets() -> dict[str, list[str]]:
    """Head -> class names, derived from the world vocabulary (order is part of the weights)."""
    from fewstep.bench import world

    subjects = [s.key for s in (*world.PORTRAIT, *world.LANDSCAPE)]
    return {
        "subject": subjects,
        "tone": ["none", *world.SKIN_TONES],
        "style": ["none", *world.STYLES],
    }


class RecognizerNet(nn.Module):
    """A 5x5 stride-2 stem then three 3x3 blocks (48-96-192-240 channels at width 48), global
    average pool, one linear head per task. The strided stem is ~10x cheaper to train on CPU than
    a full-resolution first layer (oneDNN is slow on 3-channel 64x64 maps) at no accuracy cost.
    """

    def __init__(self, heads: dict[str, int], width: int = 48) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 5]
        layers: list[nn.Module] = []
        for i in range(4):
            kernel, stride = (5, 2) if i == 0 else (3, 1)
            layers += [nn.Conv2d(chans[i], chans[i + 1], kernel, stride=stride, padding=kernel // 2, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(chans[-1], n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x).mean(dim=(2, 3))
        return {name: head(feats) for name, head in self.heads.items()}


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of any size -> [N, 3, 64, 64] in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
                         if im.size != (INPUT_SIZE, INPUT_SIZE) else im.convert("RGB"), dtype=np.float32)
              for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


class RecognizerMissing(FileNotFoundError):
    pass


class Recognizer:
    """Loads the shipped weights once; ``predict`` returns per-head probabilities."""

    def __init__(self, weights: Path = WEIGHTS, card: Path = CARD) -> None:
        if not weights.exists() or not card.exists():
            raise RecognizerMissing(f"recogniser weights not found at {weights}: train them with "
                                    "`fewstep bench train-recognizers` (a few minutes on CPU)")
        from safetensors.torch import load_file

        self.card: dict[str, Any] = json.loads(card.read_text())
        self.labels: dict[str, list[str]] = self.card["labels"]
        expected = label_sets()
        if self.labels != expected:
            raise RecognizerMissing(f"{card} was trained on another world vocabulary (world_version "
                                    f"{self.card.get('world_version')}); retrain with "
                                    "`fewstep bench train-recognizers`")
        self.net = RecognizerNet({k: len(v) for k, v in self.labels.items()}, width=int(self.card["width"]))
        self.net.load_state_dict(load_file(str(weights)))
        self.net.eval()
        self._lock = threading.Lock()

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[dict[str, dict[str, float]]]:
        """For each image: ``{head: {label: probability}}``."""
        if not images:
            return []
        with self._lock:
            out = self.net(to_tensor(images))
        probs = {name: torch.softmax(logits.double(), dim=1).numpy() for name, logits in out.items()}
        return [{name: dict(zip(self.labels[name], map(float, probs[name][i]))) for name in probs}
                for i in range(len(images))]


_shared: Recognizer | None = None
_shared_lock = threading.Lock()


def shared_recognizer() -> Recognizer:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Recognizer()
        return _shared
