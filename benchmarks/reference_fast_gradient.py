"""Plain-PyTorch peers of the recipe's callback ways on FC100-100-10: the same figures without the callback.

    python benchmarks/reference_fast_gradient.py [--method pools] [--seeds 0 1 2] [--epochs 30] [--shift-pixels 1]
    python benchmarks/reference_fast_gradient.py --method pgd --seeds 0 1
    python benchmarks/reference_fast_gradient.py --method fast --seeds 0 1
    python benchmarks/reference_fast_gradient.py --method pgd --seeds 0 --order-seed 1
    python benchmarks/reference_fast_gradient.py --method pgd --seeds 0 --callback-randomness
    python benchmarks/reference_fast_gradient.py --method pgd --seeds 0 --epochs 1 --callback-randomness \
        --compare-weights runs/pgd-1-epoch/pgd.pt
    python benchmarks/reference_fast_gradient.py --method pgd --seeds 0 --callback-randomness --jitter-seed 1

``--order-seed`` keeps the seed's initial weights but draws everything random after them (the
batches' order, random starts, shifts) from another seed: how far a run moves on randomness alone.
``--callback-randomness`` (pgd, fast) draws them as the recipe's way does for the seed instead: the
data module's batch order, the callback's random starts and its pool's draws, so that at each
epoch's last, shorter batch the loop too trains on a random draw from the examples of that batch and
of the batch before's last rows (the recipe's pool holds a full batch's worth), and the loop and the
recipe differ only in what runs around the step (results before this mixed step was reproduced lack
``"mixed_last_batch"``); ``--compare-weights`` then reports how far the loop's weights are
from those a recipe run of the same seed and epochs saved. ``--jitter-seed`` multiplies every initial
weight by ``1 + 1e-6·N(0, 1)`` (``--jitter-scale``), drawn from that seed's own generator, and changes
nothing else: how far a run moves on a difference the size of rounding.

``--method pools`` (the default) is the peer of the recipe's fast-gradient pools
(``recipes/configs/fast-gradient-input.yaml``): each step trains on the whole clean batch and on its
own fast-gradient examples, each clean row moved one L2 step of ``sqrt(mean r²)`` 0.036 up its
cross-entropy gradient and clipped to [0, 1]; the loss is the mean of the two cross-entropies.
``--method pgd`` is PGD adversarial training as Madry et al. (2018) ran it on MNIST: each step trains
on the batch's PGD examples only (L∞ 0.3, 40 sign steps of 0.01 from a uniformly random point of
the ball); ``--method fast`` is fast adversarial training as Wong et al. (2020) ran it on MNIST: one
sign step of 0.375 from a uniformly random point of the L∞ ball of 0.3, projected back. These two are
the peers of the recipe's ``--ways pgd fast`` (``recipes/configs/pgd-mnist.yaml``, ``fast-mnist.yaml``).
Every method adds the recipe's per-layer weight penalties (×``--penalty-scale``) and uses SGD with
Nesterov momentum 0.9 and a cosine schedule, as the recipe's ``Classifier``; with ``--shift-pixels``
each batch's clean images are first moved by random offsets (``advtrain.data.random_shift``), as the
recipe's ``--shift-pixels`` does. No Lightning, no pool, no callback, no advtrain attack: where this
loop's figures match the recipe's within seed noise, the callback adds nothing and loses nothing.

Reports per seed: test error, training error, the mean minimal distortion (the recipe's measure on
the same fixed 200 test images) and seconds, and for pgd and fast the robust errors by the recipe's
final evaluation; writes ``benchmarks/results/reference_<method>/results.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from advtrain.callbacks import AdversarialEvaluation
from advtrain.data import MNISTDataModule, random_shift
from advtrain.models import fc100_100_10
from advtrain.recipes.adversarial_training import MODEL_DEFAULTS, final_evaluation
from advtrain.recipes.paper_models import error_rate
from advtrain.recipes.run_folder import write_json

#: sqrt(mean r²) of one step: an L2 step of 1.0 on a 28×28 image (the recipe's --step-distortion default).
STEP_DISTORTION = 0.036


def fast_gradient_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, distortion: float) -> torch.Tensor:
    """``images`` moved one L2 step of ``sqrt(mean r²) = distortion`` up the cross-entropy, clipped to [0, 1]."""
    images = images.detach().requires_grad_(True)
    gradient, = torch.autograd.grad(nn.functional.cross_entropy(model(images), labels), images)
    flat = gradient.flatten(1)
    direction = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    step = distortion * flat.shape[1] ** 0.5 * direction
    return (images.detach() + step.view_as(images)).clamp(0, 1)


def pgd_examples(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float, steps: int,
                 step_size: float, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Madry et al.'s L∞ PGD: from a uniformly random point of the ε-ball (clipped to [0, 1]),
    ``steps`` signed gradient steps of the cross-entropy, each projected onto the ball and the box.
    ``uniform`` (the images' shape, in [0, 1)) gives the random start's draws (default: drawn here
    from torch's global generator)."""
    uniform = torch.rand_like(images) if uniform is None else uniform
    delta = (uniform * 2 - 1) * epsilon
    points = (images + delta).clamp(0, 1)
    for _ in range(steps):
        points = points.detach().requires_grad_(True)
        gradient, = torch.autograd.grad(nn.functional.cross_entropy(model(points), labels), points)
        points = torch.minimum(torch.maximum(points.detach() + step_size * gradient.sign(), images - epsilon), images + epsilon)
        points = points.clamp(0, 1)
    return points.detach()


#: The examples PGD and fast adversarial training train on: (model, images, labels, uniform) -> the
#: attacked images; ``uniform`` is the random start's draws (None: drawn from torch's global generator).
ADVERSARIES = {
    "pgd": lambda model, images, labels, uniform: pgd_examples(
        model, images, labels, epsilon=0.3, steps=40, step_size=0.01, uniform=uniform),
    "fast": lambda model, images, labels, uniform: pgd_examples(
        model, images, labels, epsilon=0.3, steps=1, step_size=0.375, uniform=uniform),
}

#: Each method's loss on one batch: (model, images, labels, uniform) -> the cross-entropy it trains on.
METHODS = {
    "pools": lambda model, images, labels, uniform: 0.5 * (
        nn.functional.cross_entropy(model(images), labels)
        + nn.functional.cross_entropy(model(fast_gradient_step(model, images, labels, STEP_DISTORTION)), labels)),
    **{name: (lambda model, images, labels, uniform, adversary=adversary: nn.functional.cross_entropy(
        model(adversary(model, images, labels, uniform)), labels)) for name, adversary in ADVERSARIES.items()},
}


class CallbackRandomness:
    """The batch order, random starts and pool draws the recipe's ``pgd`` and ``fast`` ways make for
    a seed: the data module's order (:class:`~advtrain.data.mnist.EpochShuffle`), the callback's
    generator (``torch.Generator().manual_seed(seed)``), from which each refresh draws the random
    starts of the newest ``batch_size`` clean rows, and the input pool's (seeded alike), which
    places a refresh's examples in the pool and draws the rows a batch trains on. At an epoch's
    last, shorter batch the newest ``batch_size`` rows include rows of the batch before, and the
    batch trains on a random draw from their examples (:meth:`attacked_rows`, :meth:`mixed`): the
    one step an epoch that is not the batch's own PGD examples."""

    def __init__(self, count: int, seed: int, batch_size: int) -> None:
        from advtrain.data.mnist import EpochShuffle

        self.order = EpochShuffle(count, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.pool_generator = torch.Generator().manual_seed(seed)  # the input pool's: seed + its index, 0
        self.batch_size = batch_size
        self.recent: tuple[torch.Tensor, torch.Tensor] | None = None  # the newest batch_size clean rows
        self.pool: tuple[torch.Tensor, torch.Tensor] | None = None  # its examples and labels, batch_size slots
        self.pool_size = 0

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The training rows in epoch ``epoch``'s order."""
        self.order.set_epoch(epoch)
        return torch.tensor(list(self.order))

    def uniform(self, images: torch.Tensor) -> torch.Tensor:
        """The random start's draws for ``images``, as the callback's generator gives them."""
        draws = torch.rand((self.batch_size, images[0].numel()), generator=self.generator, dtype=images.dtype)
        return draws[-images.shape[0]:].view_as(images)

    def attacked_rows(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Remember this batch's clean rows; the newest ``batch_size`` rows seen, which the callback's
        refresh attacks (this batch's last)."""
        if self.recent is not None:
            images, labels = torch.cat([self.recent[0], images]), torch.cat([self.recent[1], labels])
        self.recent = images[-self.batch_size:], labels[-self.batch_size:]
        return self.recent

    def mixed(self, examples: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Put ``examples`` into the pool as :class:`~advtrain.pool.AdversarialPool` does (free slots
        first, then randomly chosen ones), draw the sample the callback's refresh measures the pool's
        error on, then the ``count`` rows the batch trains on."""
        if self.pool is None:
            self.pool = (torch.zeros(self.batch_size, *examples.shape[1:], dtype=examples.dtype),
                         torch.zeros(self.batch_size, dtype=torch.long))
        free = min(self.batch_size - self.pool_size, examples.shape[0])
        slots = torch.arange(self.pool_size, self.pool_size + free)
        if examples.shape[0] > free:
            replaced = torch.randperm(self.pool_size, generator=self.pool_generator)[:examples.shape[0] - free]
            slots = torch.cat([slots, replaced])
        self.pool[0][slots], self.pool[1][slots] = examples.detach(), labels
        self.pool_size += free
        torch.randperm(self.pool_size, generator=self.pool_generator)  # the refresh's pool-error sample (all of it)
        if count <= self.pool_size:
            index = torch.randperm(self.pool_size, generator=self.pool_generator)[:count]
        else:
            index = torch.randint(self.pool_size, (count,), generator=self.pool_generator)
        return self.pool[0][index], self.pool[1][index]

    def loss(self, method: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cross-entropy the recipe's ``method`` way trains on for this batch: the attacked
        rows' examples, mixed in through the pool."""
        rows, row_labels = self.attacked_rows(images, labels)
        examples = ADVERSARIES[method](model, rows, row_labels, self.uniform(rows))
        examples, example_labels = self.mixed(examples, row_labels, images.shape[0])
        return nn.functional.cross_entropy(model(examples), example_labels)


def jitter_weights(model: nn.Module, scale: float, seed: int) -> None:
    """Multiply every parameter of ``model`` in place by ``1 + scale·N(0, 1)``, the noise drawn from
    ``torch.Generator().manual_seed(seed)``, so the global random stream is left as it was."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.mul_(1 + scale * noise)


def train_one_seed(data: MNISTDataModule, seed: int, epochs: int, batch_size: int, lr: float,
                   penalty_scale: float, shift_pixels: int = 0, method: str = "pools",
                   order_seed: int | None = None, callback_randomness: bool = False,
                   jitter: tuple[float, int] | None = None) -> tuple[nn.Module, float]:
    """Train FC100-100-10 by ``method`` (:data:`METHODS`), its images shifted by up to
    ``shift_pixels``; the model and the seconds. The initial weights come from ``seed``; the
    randomness after them from ``order_seed`` where given (else from ``seed``'s stream), or with
    ``callback_randomness`` the batch order and random starts the recipe draws for ``seed``
    (:class:`CallbackRandomness`). ``jitter`` (scale, seed) perturbs the initial weights
    (:func:`jitter_weights`)."""
    torch.manual_seed(seed)
    shifts = torch.Generator().manual_seed(seed if order_seed is None else order_seed)
    paper_model = fc100_100_10()
    if order_seed is not None:
        torch.manual_seed(order_seed)
    model = paper_model.module
    if jitter is not None:
        jitter_weights(model, *jitter)
    modules = dict(model.named_modules())
    penalties = [(modules[name], penalty_scale * strength) for name, strength in paper_model.penalties.items()]
    images, labels = data.train_set.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    batch_loss = METHODS[method]
    matched = CallbackRandomness(len(images), seed, batch_size) if callback_randomness else None
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images)) if matched is None else matched.epoch_order(epoch)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            batch, batch_labels = images[index], labels[index]
            if shift_pixels:
                batch = random_shift(batch, shift_pixels, shifts)
            if matched is None:
                loss = batch_loss(model, batch, batch_labels, None)
            else:
                loss = matched.loss(method, model, batch, batch_labels)
            for layer, strength in penalties:
                loss = loss + strength * layer.weight.pow(2).sum() / layer.weight.shape[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), time.perf_counter() - started


def weight_difference(model: nn.Module, path: Path) -> dict:
    """The largest absolute difference between ``model``'s weights and those a recipe run saved at
    ``path`` (``<way>.pt``, a state dict), and the largest absolute weight, for scale."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    if saved.keys() != ours.keys():
        raise SystemExit(f"{path}: its weights {sorted(saved)} are not FC100-100-10's {sorted(ours)}")
    return {"path": str(path), "max_abs_difference": max(float((saved[k] - v).abs().max()) for k, v in ours.items()),
            "max_abs_weight": max(float(v.abs().max()) for v in ours.values())}


def measure(data: MNISTDataModule, seeds: list[int], epochs: int, batch_size: int, lr: float,
            penalty_scale: float, eval_examples: int, shift_pixels: int = 0, method: str = "pools",
            order_seed: int | None = None, callback_randomness: bool = False,
            compare_weights: Path | None = None, jitter: tuple[float, int] | None = None) -> dict:
    """Train and evaluate one model per seed: for pools the minimal distortion (the recipe's search
    of that run), for pgd and fast also the robust errors (the recipe's final evaluation)."""
    test_images, test_labels = data.test_set.tensors
    train_images, train_labels = data.train_set.tensors
    runs = []
    for seed in seeds:
        model, seconds = train_one_seed(data, seed, epochs, batch_size, lr, penalty_scale, shift_pixels, method,
                                        order_seed, callback_randomness, jitter)
        evaluation = AdversarialEvaluation(examples=eval_examples, seed=seed) if method == "pools" else \
            final_evaluation(eval_examples, seed, MODEL_DEFAULTS["sigmoid-mlp"]["eval_target"])
        report, _ = evaluation.evaluate(model, *evaluation.subset(data.test_dataloader()))
        runs.append({"seed": seed, "order_seed": order_seed, "callback_randomness": callback_randomness,
                     "mixed_last_batch": callback_randomness,
                     "jitter": None if jitter is None else {"scale": jitter[0], "seed": jitter[1]},
                     "test_error": error_rate(model, test_images, test_labels),
                     "train_error": error_rate(model, train_images, train_labels),
                     "mean_distortion": report.mean_distortion, "seconds": seconds,
                     "robust_error": {norm: {f"{e:g}": v for e, v in errors.items()}
                                      for norm, errors in report.robust_error.items()}})
        if compare_weights is not None:
            runs[-1]["weights_against"] = weight_difference(model, compare_weights)
        print(json.dumps(runs[-1]), flush=True)
    mean_test_error = sum(run["test_error"] for run in runs) / len(runs)
    settings = {"method": method, "epochs": epochs, "batch_size": batch_size, "lr": lr, "penalty_scale": penalty_scale,
                "eval_examples": eval_examples, "shift_pixels": shift_pixels, "order_seed": order_seed,
                "callback_randomness": callback_randomness, "mixed_last_batch": callback_randomness,
                "threads": torch.get_num_threads(),
                "jitter": None if jitter is None else {"scale": jitter[0], "seed": jitter[1]}}
    if method == "pools":
        settings["step_distortion"] = STEP_DISTORTION
    return {"settings": settings, "runs": runs, "mean_test_error": mean_test_error}


def main() -> None:
    """Measure, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="pools",
                        help="pools: the fast-gradient pools' peer; pgd, fast: the recipe's pgd and fast ways' peers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--penalty-scale", type=float, default=None,
                        help="default: 30 for pools (the headline run's), 300 for pgd and fast (the recipe's default)")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--shift-pixels", type=int, default=0, help="random shifts of the training images (0: none)")
    parser.add_argument("--order-seed", type=int, default=None,
                        help="draw the batches' order and random starts from this seed, the weights from --seeds")
    parser.add_argument("--callback-randomness", action="store_true",
                        help="pgd, fast: draw the batches' order and random starts as the recipe's way does for the seed")
    parser.add_argument("--compare-weights", type=Path, default=None,
                        help="a recipe run's saved weights (<way>.pt) to compare the trained weights with (one seed)")
    parser.add_argument("--jitter-seed", type=int, default=None,
                        help="perturb the initial weights by a relative --jitter-scale, drawn from this seed")
    parser.add_argument("--jitter-scale", type=float, default=1e-6)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/reference_fast_gradient (pools), reference_<method> (others)")
    args = parser.parse_args()
    if args.callback_randomness and (args.method == "pools" or args.order_seed is not None or args.shift_pixels):
        parser.error("--callback-randomness is for --method pgd or fast, without --order-seed or --shift-pixels")
    if args.compare_weights is not None and len(args.seeds) != 1:
        parser.error("--compare-weights compares one seed's weights: give one --seeds")
    if not 0 < args.jitter_scale < 1:
        parser.error(f"--jitter-scale must lie in (0, 1), got {args.jitter_scale}")
    if args.penalty_scale is None:
        args.penalty_scale = 30.0 if args.method == "pools" else MODEL_DEFAULTS["sigmoid-mlp"]["penalty_scale"]
    if args.output is None:
        name = "fast_gradient" if args.method == "pools" else args.method
        args.output = Path(f"benchmarks/results/reference_{name}")
    data = MNISTDataModule(args.data_dir, batch_size=args.batch_size, val_size=0)
    data.prepare_data()
    data.setup()
    result = measure(data, args.seeds, args.epochs, args.batch_size, args.lr, args.penalty_scale, args.eval_examples,
                     args.shift_pixels, args.method, args.order_seed, args.callback_randomness, args.compare_weights,
                     None if args.jitter_seed is None else (args.jitter_scale, args.jitter_seed))
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)  # strict JSON (NaN as null), written atomically
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
