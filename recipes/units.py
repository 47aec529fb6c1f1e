"""``advtrain units``: the paper's Figures 1 and 2, natural basis versus random directions.

A convolutional net trained on MNIST (or loaded from ``--checkpoint``); for units of one layer
and for random directions of the same layer, the MNIST test images that most activate each. The
figure goes to a PNG and to W&B; the mean label purity of the top images (1.0: all the same digit),
over many directions of each kind, says in one number whether random directions are as
semantically coherent as units, the paper's observation.

Reads top to bottom: settings, run folder, data, the model (trained or loaded), activations,
directions, top images, purity, figure, results.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from advtrain.analysis.units import TopActivating, layer_activations, random_directions, top_activating
from advtrain.data import MNISTDataModule
from advtrain.models import build_model
from advtrain.recipes.paper_models import prepared_mnist
from advtrain.recipes.run_folder import (add_common_arguments, log_image, log_table, save_weights, start_run_folder,
                                        start_wandb, write_results)
from advtrain.recipes.train import error_on, train_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain units``."""
    parser.add_argument("--checkpoint", type=Path, default=None, help="a state dict of mnist_convnet (else trained here)")
    parser.add_argument("--layer", default="relu3", help="the layer whose units and directions are analysed")
    parser.add_argument("--shown", type=int, default=4, help="directions of each kind drawn in the figure")
    parser.add_argument("--measured", type=int, default=50, help="directions of each kind behind the purity figure")
    parser.add_argument("--top", type=int, default=8, help="images per direction")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 training images, one epoch")
    add_common_arguments(parser, "runs/units")


def convnet(args: argparse.Namespace, data: MNISTDataModule) -> nn.Module:
    """The convnet from ``--checkpoint``, or trained here with ``advtrain train``'s loop."""
    if args.checkpoint is not None:
        module = build_model("convnet").module
        module.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        return module
    settings = argparse.Namespace(model="convnet", seed=args.seed, quick=args.quick, penalty_scale=None,
                                  optimizer="sgd", lr=args.lr, epochs=args.epochs, accelerator=args.accelerator,
                                  output=args.output, batch_size=args.batch_size)
    classifier, _ = train_model(settings, data)
    save_weights(args.output / "convnet.pt", classifier.model.state_dict())
    print(f"convnet test error {100 * error_on(classifier, *data.test_set.tensors):.2f}%")
    return classifier.model.cpu()


def active_units(activations: torch.Tensor, count: int, seed: int) -> list[int]:
    """``count`` seeded units among those that vary over the images (dead units have no top images)."""
    alive = torch.nonzero(activations.std(0) > 0).flatten()
    if len(alive) == 0:
        raise ValueError("every unit of the layer is constant over the images: nothing to analyse")
    order = torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))
    return [int(alive[i]) for i in order[:count]]


def figure(rows: list[tuple[str, TopActivating]], path: Path, scale: int = 3) -> None:
    """One row per direction: its name, then its top images, best first."""
    from PIL import Image, ImageDraw

    tile, label_width, gap = 28 * scale, 150, 4
    top = rows[0][1].images.shape[0]
    canvas = Image.new("L", (label_width + top * (tile + gap), len(rows) * (tile + gap)), color=255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, found) in enumerate(rows):
        y = r * (tile + gap)
        draw.text((4, y + tile // 2 - 6), name, fill=0)
        for c, image in enumerate(found.images):
            pixels = (image.reshape(28, 28).clamp(0, 1) * 255).to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(pixels, mode="L").resize((tile, tile), Image.NEAREST), (label_width + c * (tile + gap), y))
    canvas.save(path)


def run(args: argparse.Namespace) -> dict:
    """Train or load the net, find the top images per direction, draw and measure."""
    start_run_folder(args)
    data = prepared_mnist(args)
    started = time.perf_counter()
    model = convnet(args, data)
    images, labels = data.test_set.tensors
    if args.quick:
        images, labels = images[:2000], labels[:2000]
    phi = layer_activations(model, args.layer, images)
    measured = max(args.measured, args.shown)
    units = active_units(phi, measured, args.seed)
    directions = random_directions(phi.shape[1], measured, args.seed)
    by_unit = [top_activating(model, args.layer, u, images, args.top, activations=phi) for u in units]
    by_random = [top_activating(model, args.layer, v, images, args.top, activations=phi) for v in directions]
    purity = {"unit": sum(t.label_purity(labels) for t in by_unit) / len(by_unit),
              "random": sum(t.label_purity(labels) for t in by_random) / len(by_random)}
    shown = [(f"unit {u}", t) for u, t in zip(units[: args.shown], by_unit)]
    shown += [(f"random direction {i + 1}", t) for i, t in enumerate(by_random[: args.shown])]
    figure(shown, args.output / "units.png")
    results = {"layer": args.layer, "units": units[: args.shown], "images": len(images), "top": args.top,
               "directions_measured": len(units), "mean_label_purity": purity,
               "top_labels": {name: labels[t.indices].tolist() for name, t in shown},
               "seconds": time.perf_counter() - started}
    text = (f"| directions at {args.layer} ({len(units)} of each kind, top {args.top} of {len(images)} test images) "
            f"| mean label purity |\n|---|---|\n| natural basis (single units) | {purity['unit']:.3f} |\n"
            f"| random directions | {purity['random']:.3f} |\n\nFigure: {args.output / 'units.png'}\n")
    write_results(args, results, text)
    wandb_run = start_wandb(args, "units")
    if wandb_run is not None:
        log_image(wandb_run, "units/figure", args.output / "units.png", "rows: single units, then random directions")
        log_table(wandb_run, "units/purity", ["directions", "mean label purity"], [[k, v] for k, v in purity.items()])
        wandb_run.finish()
    return results
