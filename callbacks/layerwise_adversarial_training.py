"""``LayerwiseAdversarialTraining``: the paper's Section 4.2 as a drop-in Lightning callback.

Follow one batch: ``on_train_batch_start`` keeps the batch's clean rows in a small buffer of
recent rows, picks this step's layer k (:meth:`layer_for_step`), refreshes k's pool from the
recent clean rows when due (:meth:`should_refresh`), then
overwrites the batch's last rows with pool examples and their true labels. For ``"input"`` the
rows are images; for a hidden layer a one-shot forward hook on layer k replaces those rows of k's
output with the pool's activations, so they train only the layers above k: no gradient from
them reaches layer k or below. The model's forward then runs as usual, and the logger receives
each layer's pool size, pool error, generation success, distortion and time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from advtrain.attacks import AttackResult, BoxLBFGS, FastGradient
from advtrain.attacks.targets import POLICIES, TargetPolicy
from advtrain.checks import check_count
from advtrain.layers import INPUT, Bounds, estimated_bounds, known_bounds, layer_names, split_at
from advtrain.pool import AdversarialPool

#: Attack settings for generation: far cheaper than the evaluation defaults (an adversarial example
#: need not be minimal to train on) with the margin loss. On FC100-100-10 they find an example for
#: every one of 256 rows at each layer in 0.1 to 0.3 s, with distortion within 10% of the full search.
GENERATION_ATTACK = dict(loss="margin", search_steps=2, iterations=10)


class _Injection:
    """Pool activations waiting to replace the last rows of one layer's output in the next forward."""

    def __init__(self, layer: str, activations: torch.Tensor) -> None:
        self.layer = layer
        self.activations = activations


class LayerwiseAdversarialTraining(Callback):
    """Per-layer adversarial pools mixed into training batches, layer by layer in turn.

    Args:
        layers: the layers whose outputs get pools (``"input"`` is the input itself), named as in
            the classifier's ``named_modules()``.
        capacity: the most examples each pool holds.
        mix_fraction: the fraction of each batch's rows replaced by pool examples, at least one row
            (0.02: on FC100-100-10 with the default input pool, 1.69% and 1.62% test error over two
            seeds against weight decay's 1.73% and 1.78%, at 1.46× and 1.49× its minimal distortion;
            0.05 gave 1.95% and 0.1 gave 2.30%).
        refresh_every: a layer's pool gets fresh examples every this many of its steps.
        refresh_size: recent clean training rows attacked at each refresh (the callback keeps the
            last ``refresh_size`` rows it has seen; attacking many rows at once is far cheaper per
            row than attacking few often).
        warmup_steps, warmup_epochs: no pools (and no generation) before this global step and epoch.
        layer_weights: how often each layer is picked (default: cycle through them in turn).
        attack: what generates examples (default: ``BoxLBFGS(**GENERATION_ATTACK)``, a cheap
            minimal-perturbation search), or a :class:`~advtrain.attacks.FastGradient` step of a fixed
            size (one forward and backward pass per refresh).
        target: the wrong label each fresh example is pushed to: ``"random"`` (the paper's
            practice), ``"runner_up"``, ``"least_likely"``, ``"nearest"`` (searches every wrong
            class: that many times the generation cost) or ``"untargeted"`` (one search towards
            whichever wrong class is closest to hand).
        max_distortion: the largest ``sqrt(mean r²)`` of an example the pools keep (default: no
            limit). Successes that needed more are dropped: far enough from their origin they
            may truly look like the wrong class, and training on them with the true label teaches
            label noise (on FC100-100-10 with an input pool, half of each batch fresh and
            unbounded gave 5.1% test error; a tenth gave 2.30%, and 1.70% within 0.05).
        beyond_max_distortion: what becomes of a success that needed more than ``max_distortion``:
            ``"drop"`` it, or ``"shrink"`` its perturbation to ``max_distortion`` (the search's
            direction at that budget, inside the box since the box is convex; the shrunk example
            may no longer fool the model, and trains it like a fixed-budget attack would). On
            FC100-100-10, an input pool at half of each batch attacked every step, shrunk to 0.036
            with runner-up targets: 1.56% and 1.75% test error over two seeds, 1.42% and 1.49%
            with batches of 128 over 60 epochs; dropping instead gave 1.92%.
        stretch_to_max_distortion: also stretch the successes within ``max_distortion`` out to it,
            along the search's direction (then clipped to the box, which can leave them a little
            inside), so pooled examples sit at the budget like a fixed-budget attack's instead of
            just across the decision boundary. Needs ``max_distortion``. On FC100-100-10 (input
            pool, half of each batch of 128 attacked every step, 60 epochs, shrunk and stretched to
            0.036) with ``target="untargeted"``: 1.36%, 1.38% and 1.55% test error over three seeds
            at 1.42× to 1.46× weight decay's minimal distortion; with runner-up targets 1.52%.
        pool_failures: pool every row a ``FastGradient`` attack stepped, fooled or not, as
            fast-gradient adversarial training trains on them all (default: only the rows it fooled,
            as for a search). Needs ``attack=FastGradient(...)``, whose step size is the budget, so
            it does not combine with ``max_distortion``. On FC100-100-10 (input pool, half of each
            batch of 128 from steps of 0.036 of its other half, untargeted, pools of 128, 60 epochs):
            1.48%, 1.31% and 1.34% test error over three seeds at 1.35× to 1.39× weight decay's minimal
            distortion, as the stretched L-BFGS search gives, at a seventh to a tenth of its generation
            time; with pools of 64 (``capacity`` equal to the rows stepped, so each batch gets its own
            rows' steps) over 120 epochs: 1.18%, 1.22% and 1.33% at 1.297× to 1.34×.
        module: the classifier as a named submodule of the LightningModule (default: the
            LightningModule's own forward is the classifier).
        input_key, label_key: where a dict batch keeps inputs and labels.
        bounds: per-layer boxes overriding the ones the layer types imply (others are estimated
            per unit from the first batch's clean activations).
        pool_device: where pools live (``"cpu"`` keeps accelerator memory free).
        seed: seeds layer choice, pool replacement and targets (offset by the rank under DDP).

    Raises:
        ValueError: bad settings (here), or at setup, before the first step: an unknown layer, a
            cut that is not clean, a batch it cannot read or whose tensors are slices of a larger
            tensor (writing pool rows into them would overwrite it), a capacity below the rows mixed in.

    Example::

        trainer = pl.Trainer(callbacks=[LayerwiseAdversarialTraining(layers=["input", "sigmoid1", "sigmoid2"],
                                                                     module="model")])

    Reference: Szegedy et al. (2013), Section 4.2.
    """

    def __init__(
        self,
        layers: Sequence[str] = (INPUT,),
        *,
        capacity: int = 4096,
        mix_fraction: float = 0.02,
        refresh_every: int = 96,
        refresh_size: int = 256,
        warmup_steps: int = 0,
        warmup_epochs: int = 0,
        layer_weights: Sequence[float] | None = None,
        attack: BoxLBFGS | FastGradient | None = None,
        target: TargetPolicy = "random",
        max_distortion: float | None = None,
        beyond_max_distortion: Literal["drop", "shrink"] = "drop",
        stretch_to_max_distortion: bool = False,
        pool_failures: bool = False,
        module: str | None = None,
        input_key: str = "x",
        label_key: str = "y",
        bounds: Mapping[str, Bounds] | None = None,
        pool_device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        layers = list(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be a non-empty list of distinct layer names, got {layers!r}")
        if not 0.0 < mix_fraction <= 1.0:
            raise ValueError(f"mix_fraction must be in (0, 1], got {mix_fraction}")
        for name, value in (("capacity", capacity), ("refresh_every", refresh_every), ("refresh_size", refresh_size)):
            check_count(name, value)
        for name, value in (("warmup_steps", warmup_steps), ("warmup_epochs", warmup_epochs)):
            check_count(name, value, minimum=0)
        if target not in POLICIES:
            raise ValueError(f"target must be one of {POLICIES}, got {target!r}")
        if max_distortion is not None and not (max_distortion > 0 and math.isfinite(max_distortion)):
            raise ValueError(f"max_distortion must be positive and finite (or None), got {max_distortion}")
        if beyond_max_distortion not in ("drop", "shrink"):
            raise ValueError(f"beyond_max_distortion must be 'drop' or 'shrink', got {beyond_max_distortion!r}")
        if beyond_max_distortion == "shrink" and max_distortion is None:
            raise ValueError("beyond_max_distortion='shrink' needs max_distortion, the budget to shrink to")
        if stretch_to_max_distortion and max_distortion is None:
            raise ValueError("stretch_to_max_distortion=True needs max_distortion, the budget to stretch to")
        if pool_failures and not isinstance(attack, FastGradient):
            raise ValueError("pool_failures=True needs attack=FastGradient(...): a search's failures have no "
                             f"perturbation to train on; got attack={attack!r}")
        if pool_failures and max_distortion is not None:
            raise ValueError("pool_failures=True pools fixed-size steps (FastGradient's distortion sets their "
                             "size); leave max_distortion at None")
        if layer_weights is not None:
            weights = [float(w) for w in layer_weights]
            if len(weights) != len(layers) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"layer_weights must give one non-negative weight per layer ({len(layers)}), "
                                 f"not all zero; got {list(layer_weights)!r}")
        self.layers = layers
        self.capacity = capacity
        self.mix_fraction = mix_fraction
        self.refresh_every = refresh_every
        self.refresh_size = refresh_size
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.layer_weights = None if layer_weights is None else torch.tensor(weights)
        self.attack = attack if attack is not None else BoxLBFGS(**GENERATION_ATTACK)
        self.target = target
        self.max_distortion = max_distortion
        self.beyond_max_distortion = beyond_max_distortion
        self.stretch_to_max_distortion = stretch_to_max_distortion
        self.pool_failures = pool_failures
        self.module = module
        self.input_key, self.label_key = input_key, label_key
        self.bounds_override = dict(bounds or {})
        self.seed = seed
        self.pools = {layer: AdversarialPool(capacity, device=pool_device, seed=seed + index)
                      for index, layer in enumerate(layers)}
        self.generator = torch.Generator().manual_seed(seed)
        self.boxes: dict[str, Bounds] = {}
        self.steps_taken = {layer: 0 for layer in layers}  # adversarial steps per layer
        self.stats: dict[str, dict[str, float]] = {}  # the last refresh of each layer
        self.seconds_generating = 0.0  # in this process, all refreshes together
        self._classifier: nn.Module | None = None
        self._cuts: dict[str, tuple[nn.Module, nn.Module]] = {}
        self._hooks: list[Any] = []
        self._injection: _Injection | None = None
        self._recent: list[tuple[torch.Tensor, torch.Tensor]] = []  # recent clean (inputs, labels)

    @property
    def state_key(self) -> str:
        """Distinguishes instances with different layers in one checkpoint."""
        return self._generate_state_key(layers=tuple(self.layers), capacity=self.capacity)

    # ---- setup: everything that needs the model, checked before the first step ----

    def classifier(self, pl_module: pl.LightningModule) -> nn.Module:
        """The classifier: ``pl_module`` itself, or its submodule named ``module``."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as error:
            children = ", ".join(name for name, _ in pl_module.named_children())
            raise ValueError(f"module `{self.module}` is not a submodule of {type(pl_module).__name__}; "
                             f"its children are: {children}") from error

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the classifier, cut it at every layer, hook the hidden layers."""
        if stage != "fit":
            return
        classifier = self.classifier(pl_module)
        names = layer_names(classifier)
        for layer in [*self.layers, *self.bounds_override]:
            if layer not in names:
                raise ValueError(f"unknown layer `{layer}`; layers are: {', '.join(names)}")
        self._classifier = classifier
        self._cuts = {layer: split_at(classifier, layer) for layer in self.layers}  # raises on unclean cuts
        for layer in self.layers:
            if layer in self.bounds_override:
                self.boxes.setdefault(layer, self.bounds_override[layer])
            elif (box := known_bounds(classifier, layer)) is not None:
                self.boxes.setdefault(layer, box)
            if layer != INPUT:
                self._hooks.append(classifier.get_submodule(layer).register_forward_hook(self._make_hook(layer)))
        rank = trainer.global_rank
        if rank:  # each rank draws its own examples (a checkpoint restored later overrides this)
            self.generator.manual_seed(self.seed + 1000 * rank)
            for index, pool in enumerate(self.pools.values()):
                pool.generator.manual_seed(self.seed + index + 1000 * rank)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._injection = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read one batch to check its format, the capacity and the boxes still to estimate."""
        loader = trainer.train_dataloader
        batch = next(iter(loader)) if loader is not None else None
        if batch is None:
            return
        inputs, labels = self.read_batch(batch)
        check_writable(inputs, labels)
        mixed = self.rows_to_mix(inputs.shape[0])
        if mixed > self.capacity:
            raise ValueError(f"capacity {self.capacity} is below the {mixed} rows mixed into each batch of "
                             f"{inputs.shape[0]} (mix_fraction {self.mix_fraction}); raise capacity or lower mix_fraction")
        missing = [layer for layer in self.layers if layer not in self.boxes]
        if missing:
            inputs = inputs.to(pl_module.device)
            for layer in missing:
                self.boxes[layer] = estimated_bounds(self._classifier, layer, inputs)

    # ---- one batch ----

    def read_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of a batch: a tuple or list ``(x, y, ...)`` or a dict."""
        if isinstance(batch, Mapping):
            if self.input_key not in batch or self.label_key not in batch:
                raise ValueError(f"a dict batch needs keys `{self.input_key}` and `{self.label_key}` (set input_key and "
                                 f"label_key); it has: {', '.join(map(str, batch))}")
            inputs, labels = batch[self.input_key], batch[self.label_key]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs, labels = batch[0], batch[1]
        else:
            raise ValueError(f"cannot read a batch of type {type(batch).__name__}: expected (inputs, labels) "
                             "or a dict with input_key and label_key")
        if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor) or labels.ndim != 1:
            raise ValueError("the batch's inputs and labels must be tensors, labels of shape (N,)")
        return inputs, labels

    def rows_to_mix(self, batch_size: int) -> int:
        """How many rows of a batch come from the pool."""
        return max(1, round(self.mix_fraction * batch_size))

    def layer_for_step(self, step: int) -> str:
        """The layer whose pool this step uses: in turn, or drawn by ``layer_weights``."""
        if self.layer_weights is None:
            return self.layers[step % len(self.layers)]
        return self.layers[int(torch.multinomial(self.layer_weights, 1, generator=self.generator))]

    def should_refresh(self, layer: str) -> bool:
        """Whether this step of ``layer`` generates fresh examples: its first, then every ``refresh_every``-th."""
        return self.steps_taken[layer] % self.refresh_every == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Refresh this step's pool if due, then mix it into the batch."""
        if trainer.global_step < self.warmup_steps or trainer.current_epoch < self.warmup_epochs:
            return
        inputs, labels = self.read_batch(batch)
        layer = self.layer_for_step(trainer.global_step)
        mixed = self.rows_to_mix(inputs.shape[0])
        clean = inputs.shape[0] - mixed if mixed < inputs.shape[0] else inputs.shape[0]  # rows the pool leaves alone
        self._remember(inputs[:clean], labels[:clean])
        if self.should_refresh(layer):
            recent_inputs = torch.cat([rows for rows, _ in self._recent]).to(inputs.device)
            recent_labels = torch.cat([rows for _, rows in self._recent]).to(labels.device)
            self.refresh(layer, recent_inputs, recent_labels)
            self._log(pl_module, layer)
        self.steps_taken[layer] += 1
        pool = self.pools[layer]
        if len(pool) == 0:
            return
        check_writable(inputs, labels)
        examples, pool_labels = pool.sample(mixed)
        labels[-mixed:] = pool_labels.to(labels.device)
        if layer == INPUT:
            inputs[-mixed:] = examples.to(inputs.device, inputs.dtype).view_as(inputs[-mixed:])
        else:
            self._injection = _Injection(layer, examples.to(inputs.device))

    def _remember(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the latest ``refresh_size`` clean rows (copies: the batch is about to be overwritten)."""
        self._recent.append((inputs.detach().clone(), labels.detach().clone()))
        while sum(rows.shape[0] for rows, _ in self._recent[1:]) >= self.refresh_size:
            self._recent.pop(0)

    def _make_hook(self, layer: str):
        def replace_last_rows(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            injection = self._injection
            if injection is None or injection.layer != layer or not module.training:
                return None
            self._injection = None  # one shot: the training forward of this step
            rows = injection.activations.shape[0]
            activations = injection.activations.to(output.dtype).view(rows, *output.shape[1:])
            return torch.cat([output[:-rows], activations], dim=0)  # no gradient path into the pool rows

        return replace_last_rows

    @torch.no_grad()
    def refresh(self, layer: str, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Attack ``inputs`` at ``layer`` on the current model (in eval mode) and add the successes
        within ``max_distortion`` (or, with ``pool_failures``, every step) to the layer's pool, with
        their true labels."""
        classifier = self._classifier
        bottom, head = self._cuts[layer]
        was_training = classifier.training
        classifier.eval()
        started = time.perf_counter()
        try:
            activations = bottom(inputs)
            correct = head(activations).argmax(1) == labels
            activations, labels = activations[correct], labels[correct]
            self.attack.seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
            if labels.numel():
                lower, upper = self.boxes[layer]
                box = (_as_bound(lower, activations), _as_bound(upper, activations))
                result = self.attack(head, activations, labels, target=self.target, bounds=box)
                examples, kept = self._within_budget(activations, result, box)
                self.pools[layer].add(examples[kept], labels[kept])
                success, distortion = result.success_rate, result.mean_distortion
            else:
                success, distortion = 0.0, float("nan")
            pool_error = self._pool_error(layer, head)
        finally:
            classifier.train(was_training)
        seconds = time.perf_counter() - started
        self.seconds_generating += seconds
        self.stats[layer] = {
            "pool_size": float(len(self.pools[layer])),
            "pool_error": pool_error,
            "generation_success": success,
            "generation_distortion": distortion,
            "generation_seconds": seconds,
        }

    def _within_budget(self, inputs: torch.Tensor, result: AttackResult,
                       box: tuple[float | torch.Tensor, float | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples to pool and which of them to keep: the successes, with those beyond
        ``max_distortion`` dropped or shrunk to it, and those within it stretched to it where asked
        (with ``pool_failures``: every row's fixed-size step)."""
        if self.pool_failures:
            return result.stepped, torch.ones_like(result.success)
        if self.max_distortion is None:
            return result.adversarial, result.success
        within = result.distortion <= self.max_distortion
        kept = result.success & within if self.beyond_max_distortion == "drop" else result.success
        shrink = ~within & (self.beyond_max_distortion == "shrink")
        stretch = within & self.stretch_to_max_distortion
        rescaled = (shrink | stretch).view(-1, *([1] * (inputs.ndim - 1)))
        if not rescaled.any():
            return result.adversarial, kept
        # each row's factor on its perturbation (only the rescaled rows' are used); failures get 0
        scale = self.max_distortion / result.distortion.clamp_min(torch.finfo(result.distortion.dtype).tiny)
        examples = inputs + scale.view_as(rescaled).to(inputs.dtype) * (result.adversarial - inputs)
        if self.stretch_to_max_distortion:  # stretching can leave the box; shrinking cannot (it is convex)
            lower, upper = (torch.as_tensor(bound, dtype=examples.dtype, device=examples.device) for bound in box)
            examples = torch.clamp(examples, lower, upper)
        return torch.where(rescaled, examples, result.adversarial), kept

    def _pool_error(self, layer: str, head: nn.Module, sample: int = 256) -> float:
        """Fraction of (a sample of) the pool that the current model still gets wrong."""
        pool = self.pools[layer]
        if len(pool) == 0:
            return float("nan")
        device = next(self._classifier.parameters()).device
        examples, labels = pool.sample(min(sample, len(pool)))
        return float((head(examples.to(device)).argmax(1).cpu() != labels.cpu()).float().mean())

    def _log(self, pl_module: pl.LightningModule, layer: str) -> None:
        for name, value in self.stats[layer].items():
            if value == value:  # skip NaN
                pl_module.log(f"adv/{layer}/{name}", value, on_step=True, on_epoch=False)

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        """Pools, boxes, counters, the recent clean rows and the random state."""
        return {
            "recent": [(inputs.cpu(), labels.cpu()) for inputs, labels in self._recent],
            "pools": {layer: pool.state_dict() for layer, pool in self.pools.items()},
            "boxes": {layer: tuple(torch.as_tensor(b).cpu() for b in box) for layer, box in self.boxes.items()},
            "steps_taken": dict(self.steps_taken),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls it after ``setup``, before training resumes)."""
        for layer, pool_state in state["pools"].items():
            self.pools[layer].load_state_dict(pool_state)
        self.boxes.update({layer: tuple(box) for layer, box in state["boxes"].items()})
        self.steps_taken.update(state["steps_taken"])
        self.generator.set_state(state["generator"])
        self._recent = [tuple(chunk) for chunk in state["recent"]]


def check_writable(inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse a batch whose tensors are windows into larger ones (slices of a dataset tensor): the
    pool rows written into the batch would overwrite that tensor's rows.

    Raises:
        ValueError: naming the tensor and what to change.
    """
    for name, tensor in (("inputs", inputs), ("labels", labels)):
        if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            raise ValueError(f"the batch's {name} share memory with a larger tensor (a slice of a dataset tensor?): "
                             "the pool rows written into the batch would overwrite it; have the loader yield "
                             "copies (the default collate does, and so does indexing with an index tensor)")


def _as_bound(bound: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return bound.to(like.device, like.dtype) if isinstance(bound, torch.Tensor) else bound
