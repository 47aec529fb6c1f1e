"""The pieces the table recipes share: the paper's models trained once and reused, their errors,
minimal adversarial examples, and the perturbations the paper compares them with."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from advtrain.attacks import AttackResult, BoxLBFGS
from advtrain.data import MNISTDataModule
from advtrain.models import build_model
from advtrain.recipes.run_folder import save_weights, write_text
from advtrain.recipes.train import DEFAULTS, train_model

#: The models of the paper's Table 1, by command-line name.
TABLE1_MODELS = ("fc10-1e-4", "fc10-1e-2", "fc10-1", "fc100-100-10", "fc200-200-10", "ae400-10")


def add_training_arguments(parser: argparse.ArgumentParser, models_dir: str) -> None:
    """How models are trained (``advtrain train``'s defaults) and where they are kept for reuse."""
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--models-dir", type=Path, default=Path(models_dir),
                        help="trained models are kept here, each under a key of its training settings, and "
                             "reused only by a run with the same settings")
    parser.add_argument("--examples", type=int, default=100, help="images in the seeded subset that is attacked")
    parser.add_argument("--target", choices=["random", "nearest"], default="random",
                        help="random: a seeded random wrong label per image, the paper's practice; "
                             "nearest: the closest wrong label (the untargeted minimum)")
    parser.add_argument("--clip-noise", action="store_true", help="clip the Gaussian-noise controls to [0, 1]")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 training images, one epoch, 10 examples")


def prepared_mnist(args: argparse.Namespace, train_subset: str = "all", shift_pixels: int = 0,
                   val_size: int = 0) -> MNISTDataModule:
    """MNIST set up for a recipe: global seed set, all training images (or a paper half) for
    training but ``val_size`` held out for validation, read from ``args.data_dir``; training
    batches shifted by up to ``shift_pixels``."""
    pl.seed_everything(args.seed, workers=True)
    data = MNISTDataModule(args.data_dir, batch_size=args.batch_size, val_size=val_size, train_subset=train_subset,
                           seed=args.seed, shift_pixels=shift_pixels)
    data.prepare_data()
    data.setup()
    return data


def training_settings(name: str, args: argparse.Namespace, label: str | None = None) -> dict:
    """Everything that decides what training model ``name`` gives (not where it runs): the key under
    which a trained model is kept and reused."""
    return {"model": name, "label": label or name, "seed": args.seed, "quick": bool(args.quick), "epochs": args.epochs,
            "lr": args.lr, "batch_size": args.batch_size, "optimizer": "sgd", "penalty_scale": None}


def trained_model(name: str, args: argparse.Namespace, data: MNISTDataModule, label: str | None = None) -> nn.Module:
    """Model ``name`` trained on ``data`` with ``advtrain train``'s loop; in eval mode on the CPU.

    Trained models are kept in ``<models-dir>/<label>/<key>/model.pt``, the key a digest of
    :func:`training_settings` (written beside it as ``settings.json``), so a model is reused only by
    a run with the same settings: a quick model never stands in for a full one."""
    settings = training_settings(name, args, label)
    text = json.dumps(settings, sort_keys=True)
    folder = args.models_dir / settings["label"] / hashlib.sha256(text.encode()).hexdigest()[:12]
    path = folder / "model.pt"
    module = build_model(name).module
    if path.exists():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"{settings['label']}: loaded {path}, trained with the same settings")
        return module.eval()
    train_args = argparse.Namespace(model=name, seed=args.seed, quick=args.quick, penalty_scale=None, optimizer="sgd",
                                    lr=args.lr, epochs=args.epochs, accelerator=args.accelerator,
                                    output=folder, batch_size=args.batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "settings.json", text + "\n")
    classifier, _ = train_model(train_args, data)  # continues from its last checkpoint where one was left
    save_weights(path, classifier.model.state_dict())
    return classifier.model.cpu().eval()


@torch.no_grad()
def error_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000) -> float:
    """The share of ``images`` that ``model`` gets wrong (eval mode, CPU)."""
    model.eval()
    wrong = sum(int((model(images[i:i + batch_size]).argmax(1) != labels[i:i + batch_size]).sum())
                for i in range(0, len(images), batch_size))
    return wrong / max(len(images), 1)


def seeded_subset(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images and labels drawn without replacement with ``seed``."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[order], labels[order]


def minimal_adversarial(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
                        target: str = "random") -> tuple[torch.Tensor, AttackResult, torch.Tensor]:
    """The smallest adversarial example of every image that the box-constrained search finds for
    ``target`` (``"random"``: a seeded random wrong label; ``"nearest"``: the closest wrong label).

    Returns ``(adversarial, result, correct)``: adversarial images for all rows (an image the model
    already gets wrong is its own adversarial example, distortion 0), the search's result on the
    correct ones, and which those were.
    """
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    attack = BoxLBFGS(progress=True)
    result = attack(model, images[correct], labels[correct], target=target, generator=torch.Generator().manual_seed(seed))
    adversarial = images.clone()
    adversarial[correct] = result.adversarial.to(images.dtype)
    return adversarial, result, correct


def distortion(original: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean r²)`` per image, the paper's measure."""
    return (changed - original).flatten(1).pow(2).mean(1).sqrt()


def mean_change(original: torch.Tensor, changed: torch.Tensor) -> float:
    """The average distortion over the images a set actually changes (an image a model already got
    wrong is its own adversarial example, unchanged, and does not count)."""
    per_image = distortion(original, changed)
    moved = per_image > 0
    return float(per_image[moved].mean()) if bool(moved.any()) else 0.0


def mean_distortion_to_zero_accuracy(result: AttackResult, correct: torch.Tensor) -> float:
    """The average distortion that brings the subset to 0% accuracy (0 for images already wrong);
    ``inf`` if the search failed on any image."""
    if not bool(result.success.all()):
        return math.inf
    total = float(result.distortion.sum())
    return total / correct.numel()


def gaussian_noise(images: torch.Tensor, stddev: float, seed: int, clip: bool = False) -> torch.Tensor:
    """``images`` plus N(0, stddev²) per pixel; clipped to [0, 1] with ``clip``.

    Unclipped by default: the paper's Table 2 gives the noise rows' distortion as the stddev itself
    (0.1, 0.3), which only unclipped noise has; on MNIST's black background clipping keeps only the
    positive half of the noise, a brightening of the whole image rather than zero-mean noise.
    """
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * stddev
    noisy = images + noise.to(images)
    return noisy.clamp(0, 1) if clip else noisy


def magnified(images: torch.Tensor, adversarial: torch.Tensor, stddev: float) -> torch.Tensor:
    """Each perturbation scaled to ``sqrt(mean r²) = stddev`` (the paper's Table 4), clipped to [0, 1]."""
    perturbation = adversarial - images
    scale = stddev / distortion(images, adversarial).clamp_min(1e-12)
    return (images + perturbation * scale.view(-1, *[1] * (images.dim() - 1))).clamp(0, 1)


def save_figure5(images: torch.Tensor, adversarial: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """The paper's Figure 5 layout (originals, perturbation ×10, adversarial) as a PNG."""
    from torchvision.utils import save_image

    from advtrain.callbacks.adversarial_evaluation import figure_grid

    save_image(figure_grid(images[:columns], adversarial[:columns]), path)
    return path
