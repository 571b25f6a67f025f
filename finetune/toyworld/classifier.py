"""A small CNN that reads every toy-world attribute off an image: the project's evaluator.

It is trained on freshly generated images of *all* attributes (the held-out shape
``star`` and style ``striped`` included, since the evaluator must recognise what the
fine-tuned models are supposed to learn), with mild noise / blur / brightness
augmentation so it still reads imperfect generated images. Its penultimate features
double as the embedding for the toy Fréchet distance (``metrics.frechet_distance``).

Retrain and ship the weights with::

    python -m finetune.toyworld.classifier --out finetune/assets/toyworld_classifier.safetensors --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .world import ATTRIBUTES, draw, sample_scenes

DEFAULT_PATH = Path(__file__).parent.parent / "assets" / "toyworld_classifier.safetensors"
IMAGE_SIZE = 64
WIDTH, FEATURE_DIM = 32, 128  # the shipped weights' architecture: the first block's channels, the feature layer's


class ToyWorldClassifier(nn.Module):
    """Five conv blocks (64 -> 4 px), a 128-d feature layer, one head per attribute.

    The spatial 4x4 map is flattened (not pooled) so position stays readable.
    ~0.27 M parameters. Input: float images in [-1, 1], shape (B, 3, 64, 64).
    """

    def __init__(self):
        super().__init__()
        w, feature_dim = WIDTH, FEATURE_DIM

        def block(cin, cout, stride, k=3):
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, w, 2, k=5),  # 32 px
            *block(w, 2 * w, 2),  # 16 px
            *block(2 * w, 2 * w, 1),
            *block(2 * w, 2 * w, 2),  # 8 px
            *block(2 * w, 2 * w, 2),  # 4 px
        )
        self.fc = nn.Linear(2 * w * 4 * 4, feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (B, feature_dim), used for the Fréchet distance."""
        return F.silu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: ``{attribute: (B, len(vocabulary))}``."""
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


# --------------------------------------------------------------------------- image I/O


def to_tensor(images) -> torch.Tensor:
    """PIL images (any size/mode; resized to 64 px) or a uint8 (B, 64, 64, 3) array
    -> float tensor (B, 3, 64, 64) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack(
            [
                np.asarray(
                    im.convert("RGB")
                    if im.size == (IMAGE_SIZE, IMAGE_SIZE)
                    else im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                )
                for im in images
            ]
        )
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor([vocab.index(getattr(s, k)) for s in scenes]) for k, vocab in ATTRIBUTES.items()
    }


def make_dataset(num_images: int, seed: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """``num_images`` fresh jittered images of all attributes as uint8 (N, 64, 64, 3) + labels."""
    scenes = sample_scenes(num_images, seed, include_held_out="all")
    g = np.random.default_rng([seed, 1])
    arr = np.stack([np.asarray(draw(s, IMAGE_SIZE, g)[0]) for s in scenes])
    return arr, _labels(scenes)


# ------------------------------------------------------------------------ augmentation


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild corruptions that generated images show: blur (half the batches, sigma
    0.4-1.0 px), per-image gaussian noise (std up to 0.12 of the [-1, 1] range, ~15/255)
    and small brightness shifts (+-0.06). Kept mild so that colour classes (orange vs.
    yellow) stay separable. (Stronger blur/noise/colour shifts were tried: no better on
    corrupted images, slightly worse on clean ones.)"""
    b = x.shape[0]
    if torch.rand((), generator=g) < 0.5:
        x = _blur(x, 0.4 + 0.6 * float(torch.rand((), generator=g)))
    x = x + 0.06 * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
    x = x + 0.12 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def accuracy(model: ToyWorldClassifier, arr: np.ndarray, labels, batch_size: int = 500) -> dict[str, float]:
    """Per-attribute accuracy of ``model`` on uint8 images ``arr`` with integer ``labels``."""
    model.eval()
    correct = {k: 0 for k in ATTRIBUTES}
    for i in range(0, len(arr), batch_size):
        logits = model(to_tensor(arr[i : i + batch_size]))
        for k in ATTRIBUTES:
            correct[k] += int((logits[k].argmax(1) == labels[k][i : i + batch_size]).sum())
    return {k: c / len(arr) for k, c in correct.items()}


def train_classifier(num_images: int = 20000, seed: int = 0, steps: int = 3000) -> ToyWorldClassifier:
    """Train a fresh classifier on ``num_images`` generated images (all attributes,
    held-out ones included) for ``steps`` AdamW steps of 64 images with a one-cycle schedule
    peaking at 2e-3, its loss printed every 250 steps. About 3-4 minutes on 2 CPU cores with the defaults."""
    batch_size, lr, log_every = 64, 2e-3, 250
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    arr, labels = make_dataset(num_images, seed)
    model = ToyWorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(len(arr), (batch_size,), generator=g)
        x = augment(to_tensor(arr[idx.numpy()]), g)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    return model.eval()


# ------------------------------------------------------------------------ save / load


def save_classifier(model: ToyWorldClassifier, path: str | Path) -> None:
    """Save weights (fp32 safetensors) with the attribute vocabularies as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"attributes": json.dumps(ATTRIBUTES)})


def load_classifier(path: str | Path | None = None) -> ToyWorldClassifier:
    """Load classifier weights (default: the shipped ``assets/toyworld_classifier.safetensors``),
    in eval mode. Fails loudly if the world's vocabularies changed since training."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_PATH
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("attributes", "null"))
    if saved is not None and saved != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"{path} was trained for other attribute vocabularies; retrain it")
    model = ToyWorldClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@lru_cache(maxsize=4)
def _cached(path: str | None) -> ToyWorldClassifier:
    return load_classifier(path)


def get_classifier(model: ToyWorldClassifier | str | Path | None = None) -> ToyWorldClassifier:
    """``model`` itself, or the (cached) classifier loaded from a path / the shipped file."""
    if isinstance(model, ToyWorldClassifier):
        return model
    return _cached(None if model is None else str(model))


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def predict_logits(images, model=None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Logits per attribute for a list of PIL images (or a uint8 (N, H, W, 3) array)."""
    net = get_classifier(model)
    chunks = [net(to_tensor(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return {k: torch.cat([c[k] for c in chunks]) for k in ATTRIBUTES}


def predict(images, model=None, batch_size: int = 256) -> list[dict[str, str]]:
    """Predicted attributes per image: ``[{"shape": "star", "colour": "red", ...}, ...]``."""
    if len(images) == 0:
        return []
    logits = predict_logits(images, model, batch_size)
    idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
    return [{k: ATTRIBUTES[k][idx[k][i]] for k in ATTRIBUTES} for i in range(len(images))]


@torch.no_grad()
def extract_features(images, batch_size: int = 256) -> np.ndarray:
    """Penultimate features (N, 128) of the shipped classifier as float64, for Fréchet distances."""
    net = get_classifier()
    feats = [net.features(to_tensor(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).double().numpy()


# -------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from finetune.cli.arguments import ExamplesKeptWhole

    p = argparse.ArgumentParser(prog="python -m finetune.toyworld.classifier", formatter_class=ExamplesKeptWhole,
                                description="Train the toy-world evaluator classifier (finetune eval's), then report its accuracy on fresh images.",
                                epilog="example, the settings of the shipped one:\n  python -m finetune.toyworld.classifier --out PATH --seed 0 --threads 1")  # fmt: skip
    # Required: a default of the shipped file would replace the evaluator every score in the docs was made with.
    shipped = DEFAULT_PATH.relative_to(DEFAULT_PATH.parents[2])
    p.add_argument("--out", required=True, help=f"weights file to write (the shipped evaluator is {shipped})")
    p.add_argument("--seed", type=int, default=0, help="seed of the training images and of the weights (default 0)")
    p.add_argument("--num-images", type=int, default=20000, help="toy-world images to train on (default 20000)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--eval-images", type=int, default=2000, help="fresh images the accuracy is measured on (default 2000)")
    p.add_argument("--threads", type=int, default=2, help="torch's CPU threads (default 2)")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.is_dir() or any(parent.exists() and not parent.is_dir() for parent in out.parents):
        p.error(f"--out {out} is a folder or inside a file: give the path of the .safetensors file to write")  # before minutes of training
    torch.set_num_threads(args.threads)

    start = time.time()
    model = train_classifier(args.num_images, args.seed, args.steps)
    print(f"trained in {time.time() - start:.0f}s")
    save_classifier(model, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")

    eval_seed = args.seed + 1_000_003  # a seed never used for training
    arr, labels = make_dataset(args.eval_images, eval_seed)
    clean = accuracy(model, arr, labels)
    g = torch.Generator().manual_seed(eval_seed)
    noisy_x = ((augment(to_tensor(arr), g) + 1) * 127.5).round().clamp(0, 255).byte()
    noisy = accuracy(model, noisy_x.permute(0, 2, 3, 1).numpy(), labels)
    print(f"accuracy on {args.eval_images} fresh images (seed {eval_seed}):")
    for k in ATTRIBUTES:
        print(f"  {k:<10} clean {clean[k]:.4f}   augmented {noisy[k]:.4f}")


if __name__ == "__main__":
    main()
