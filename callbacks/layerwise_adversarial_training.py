"""``LayerwiseAdversarialTraining``: the paper's Section 4.2 as a drop-in Lightning callback.

Follow one batch: ``on_train_batch_start`` keeps the batch's clean rows in a small buffer of
recent rows, picks this step's layer k (:meth:`layer_for_step`), refreshes k's pool from the
recent clean rows when due (:meth:`should_refresh`), then overwrites the batch's last rows with
pool examples and their true labels. For ``"input"`` the rows are images; for a hidden layer a
one-shot forward hook on layer k replaces those rows of k's output with the pool's activations,
so they train only the layers above k: no gradient from them reaches layer k or below, neither
directly nor through the batch statistics of batch-norm layers above k
(:class:`~advtrain.batch_statistics.SeparateBatchStatistics`). A forward pre-hook on the
classifier first checks that the batch reached it unchanged in size, shape and order. The
model's forward then runs as usual, and the logger receives each layer's pool size, pool error,
generation success, distortion and time.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from advtrain.attacks import Attack, BoxLBFGS
from advtrain.attacks.inputs import head_for_rows
from advtrain.batch import BatchKeys, check_batch_keys, read_batch, shared_batch_keys
from advtrain.batch_statistics import SeparateBatchStatistics
from advtrain.checks import check_count
from advtrain.layers import (INPUT, UNBOUNDED, Bounds, LayerCut, LayerCutError, check_layer, cut_at, enclosing_modules,
                             known_bounds, layer_names)
from advtrain.pool import AdversarialPool
from advtrain.pooling import PoolingPolicy, Successes

#: The default generator's settings: a cheap search (an adversarial example need not be minimal to
#: train on) towards a random wrong class, the paper's practice. docs/ gives their measured cost.
GENERATION_ATTACK = dict(loss="margin", search_steps=2, iterations=10, target="random")


class _Injection:
    """Pool activations waiting to replace the last rows of one layer's output in the next forward,
    with the batch they were mixed into (to check that it reaches the classifier unchanged)."""

    def __init__(self, layer: str, activations: torch.Tensor, batch_inputs: torch.Tensor) -> None:
        self.layer = layer
        self.activations = activations
        self.batch_inputs = batch_inputs
        self.checked = False  # the classifier's inputs were compared with the batch


class LayerwiseAdversarialTraining(Callback):
    """Per-layer adversarial pools mixed into training batches, layer by layer in turn.

    Args:
        layers: the layers whose outputs get pools: ``"input"`` (the input itself) or any named
            submodule of the classifier that runs once per forward pass (a ResNet stage
            ``layer2``, one block ``layer2.0``, ``encoder.layers.0`` of a transformer).
        capacity: the most examples each pool holds.
        mix_fraction: the share of each batch's rows replaced by pool examples (at least one row).
        refresh_every: a layer's pool gets fresh examples every this many of its steps.
        refresh_size: how many recent clean training rows each refresh attacks.
        attack: the generator, any :class:`~advtrain.attacks.Attack` run with its own target
            policy (default: ``BoxLBFGS(**GENERATION_ATTACK)``, a cheap search towards random
            wrong classes; ``FastGradient(...)`` or ``PGD(...)`` for fixed-budget steps).
        pooling: what the pools keep of each result (default :class:`~advtrain.pooling.Successes`;
            :class:`~advtrain.pooling.WithinBudget` holds them to a budget,
            :class:`~advtrain.pooling.EveryStep` keeps every fixed-budget step).
        module: the classifier as a named submodule of the LightningModule (default: the
            LightningModule's own forward).
        bounds: per-layer boxes ``{layer: (low, high)}`` (scalars or tensors of one example's shape)
            overriding the defaults: ``(0, 1)`` for ``"input"``, the range a layer's type or last
            operation implies (sigmoid, tanh, ReLU, a block ending in a ReLU...), else no bound.
            Clean activations outside a layer's box widen it for the rows attacked, with a warning;
            the input box must hold the first batch.
        batch_keys: ``(inputs, labels)`` keys of a dict batch (default: found by their usual
            names, or taken from another advtrain callback in the Trainer; see :mod:`advtrain.batch`).
        pool_device: where pools live (``"cpu"`` keeps accelerator memory free).
        seed: seeds the generator handed to the attack, and pool replacement (offset by the rank
            under DDP).

    Override :meth:`layer_for_step` (which layer a step uses), :meth:`should_refresh` (when a pool
    gets fresh examples) or :meth:`is_active` (e.g. a warm-up without pools) for other schedules.

    A layer bypassed by tensors from below (a skip connection around it) would let the pool rows'
    gradient reach the layers below through them, and is refused with the enclosing modules that
    work. Hidden-layer pools replace rows of the layer's output by position: the batch must reach
    the classifier as the callback saw it; augmentation that changes its size, shape or order
    inside ``training_step`` is refused at the first step (input pools are ordinary batch rows,
    augmented like any other).

    Raises:
        ValueError: bad settings, a pooling policy the attack cannot serve (here); before the
            first step: an unknown layer (the message lists the layers), a layer that cannot be
            cut, a batch it cannot read or whose tensors are slices of a larger tensor, a capacity
            below the rows mixed in, an input box that does not hold the inputs; during training:
            a batch changed between the callback and the classifier.

    Example::

        >>> from advtrain.attacks import FastGradient
        >>> from advtrain.pooling import EveryStep
        >>> callback = LayerwiseAdversarialTraining(["input", "layer2"], module="net",
        ...                                         attack=FastGradient(distortion=0.036), pooling=EveryStep())
        >>> callback.layers, callback.attack
        (['input', 'layer2'], FastGradient(target='untargeted', distortion=0.036))

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
        attack: Attack | None = None,
        pooling: PoolingPolicy | None = None,
        module: str | None = None,
        bounds: Mapping[str, Bounds] | None = None,
        batch_keys: Sequence[str] | None = None,
        pool_device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of layer names, got the string {layers!r}; "
                             f"for one layer write [{layers!r}]")
        layers = list(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be a non-empty list of distinct layer names, got {layers!r}")
        if not 0.0 < mix_fraction <= 1.0:
            raise ValueError(f"mix_fraction must be in (0, 1], got {mix_fraction}")
        for name, value in (("capacity", capacity), ("refresh_every", refresh_every), ("refresh_size", refresh_size)):
            check_count(name, value)
        attack = attack if attack is not None else BoxLBFGS(**GENERATION_ATTACK)
        if not callable(attack):
            raise ValueError(f"attack must be an advtrain Attack, got {attack!r}")
        pooling = pooling if pooling is not None else Successes()
        pooling.check(attack)
        unknown_bounds = [name for name in (bounds or {}) if name not in layers]
        if unknown_bounds:
            raise ValueError(f"bounds are given for {', '.join(map(repr, unknown_bounds))}, which is not among the "
                             f"layers with pools {layers!r}")
        self.layers = layers
        self.capacity = capacity
        self.mix_fraction = mix_fraction
        self.refresh_every = refresh_every
        self.refresh_size = refresh_size
        self.attack = attack
        self.pooling = pooling
        self.module = module
        self.bounds_override = dict(bounds or {})
        self.batch_keys = check_batch_keys(batch_keys)
        self.seed = seed
        self.pools = {layer: AdversarialPool(capacity, device=pool_device, seed=seed + index)
                      for index, layer in enumerate(layers)}
        self.generator = torch.Generator().manual_seed(seed)
        self.boxes: dict[str, Bounds] = {}
        self.steps_taken = {layer: 0 for layer in layers}  # adversarial steps per layer
        self.stats: dict[str, dict[str, float]] = {}  # the last refresh of each layer
        self.seconds_generating = 0.0  # in this process, all refreshes together
        self._classifier: nn.Module | None = None
        self._keys: BatchKeys | None = self.batch_keys
        self._cuts: dict[str, LayerCut] = {}
        self._hooks: list[Any] = []
        self._separate: SeparateBatchStatistics | None = None
        self._injection: _Injection | None = None
        self._widened: set[str] = set()  # layers whose box was widened (warned once)
        self._logged_at: dict[str, int] = {}  # the global step each layer's statistics were last logged
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
        """Find the classifier and the batch keys; seed each rank."""
        if stage != "fit":
            return
        self._classifier = self.classifier(pl_module)
        self._keys = shared_batch_keys(trainer, self.batch_keys)
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
        if self._separate is not None:
            self._separate.remove()
            self._separate = None
        self._injection = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step, on one batch: check its format and the capacity, cut the
        classifier at every layer, set each layer's box, hook the hidden layers."""
        loader = trainer.train_dataloader
        batch = next(iter(loader)) if loader is not None else None
        if batch is None:
            return
        inputs, labels = read_batch(batch, self._keys)
        check_writable(inputs, labels)
        mixed = self.rows_to_mix(inputs.shape[0])
        if round(self.mix_fraction * inputs.shape[0]) < 1:
            warnings.warn(f"mix_fraction {self.mix_fraction} of a batch of {inputs.shape[0]} rows rounds to no row; one "
                          f"row of each batch ({1 / inputs.shape[0]:.1%}) is mixed in instead", stacklevel=2)
        if mixed > self.capacity:
            raise ValueError(f"capacity {self.capacity} is below the {mixed} rows mixed into each batch of "
                             f"{inputs.shape[0]} (mix_fraction {self.mix_fraction}); raise capacity or lower mix_fraction")
        inputs = inputs.to(pl_module.device)
        classifier = self._classifier
        was_training = classifier.training
        classifier.eval()
        try:
            with torch.no_grad():
                for layer in self.layers:
                    self._cuts[layer] = self._cut(classifier, layer, inputs)
                    self.boxes[layer] = self._box(classifier, layer, inputs)
        finally:
            classifier.train(was_training)
        for hook in self._hooks:
            hook.remove()
        self._hooks = [classifier.register_forward_pre_hook(self._check_classifier_inputs),
                       classifier.register_forward_hook(self._end_of_forward)]
        self._hooks += [classifier.get_submodule(layer).register_forward_hook(self._make_hook(layer))
                        for layer in self.layers if layer != INPUT]
        if self._separate is None and any(layer != INPUT for layer in self.layers):
            self._separate = SeparateBatchStatistics(classifier)

    def _cut(self, classifier: nn.Module, layer: str, inputs: torch.Tensor) -> LayerCut:
        """The classifier cut at ``layer``, checked on ``inputs``: a layer bypassed by tensors from
        below is refused, naming the enclosing layers that are not."""
        if layer == INPUT:
            if not inputs.dtype.is_floating_point:
                raise ValueError(f"an input pool needs floating-point inputs, got {inputs.dtype} (token ids?); "
                                 "put the pool on a layer after the embedding instead")
            return cut_at(classifier, layer, inputs)
        check_layer(classifier, layer, inputs)
        cut = cut_at(classifier, layer, inputs)
        if cut.crosses(inputs):
            names = layer_names(classifier, inputs)
            clean = [name for name in enclosing_modules(layer) if name in names and not cut_at(classifier, name, inputs).crosses(inputs)]
            instead = f"; layers enclosing it that can be used: {', '.join(clean)}" if clean else ""
            raise LayerCutError(f"tensors computed below layer `{layer}` reach the logits around it (a skip connection): "
                                f"the pool rows' gradient would train the layers below through them{instead}")
        return cut

    def _box(self, classifier: nn.Module, layer: str, inputs: torch.Tensor) -> Bounds:
        """The layer's box: the override, the range its type implies, else unbounded; checked to
        hold the clean inputs (for ``"input"``) or activations of the first batch."""
        if layer in self.bounds_override:
            box = self.bounds_override[layer]
        else:
            box = known_bounds(classifier, layer) or UNBOUNDED
        activations = self._cuts[layer].bottom(inputs)
        lower, upper = (torch.as_tensor(bound, dtype=activations.dtype, device=activations.device) for bound in box)
        try:
            outside = (activations < lower) | (activations > upper)
        except RuntimeError as error:
            raise ValueError(f"bounds for layer `{layer}` must broadcast to its output of shape "
                             f"{tuple(activations.shape[1:])}: {error}") from error
        if layer == INPUT and bool(outside.any()):
            raise ValueError(f"the inputs span [{float(activations.min()):.4g}, {float(activations.max()):.4g}], outside "
                             f"the input box {_describe(box)}; pass bounds={{'input': (low, high)}} with the range "
                             "your inputs can take (e.g. normalised images)")
        if bool(outside.any()):
            self._warn_widened(layer, int(outside.sum()), box)
        return box

    def _warn_widened(self, layer: str, count: int, box: Bounds) -> None:
        if layer not in self._widened:
            self._widened.add(layer)
            warnings.warn(f"layer `{layer}`: {count} clean activations lie outside its box {_describe(box)}; the box is "
                          f"widened to hold the activations attacked. Pass bounds={{'{layer}': (low, high)}} to set it",
                          stacklevel=2)

    # ---- one batch ----

    def read_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of a batch (:func:`advtrain.batch.read_batch`)."""
        return read_batch(batch, self._keys)

    def rows_to_mix(self, batch_size: int) -> int:
        """How many rows of a batch come from the pool."""
        return max(1, round(self.mix_fraction * batch_size))

    def layer_for_step(self, step: int) -> str:
        """The layer whose pool this step uses: each in turn (override for other schedules)."""
        return self.layers[step % len(self.layers)]

    def is_active(self, trainer: pl.Trainer) -> bool:
        """Whether this step mixes pools in (and refreshes them): always (override for a warm-up)."""
        return True

    def should_refresh(self, layer: str) -> bool:
        """Whether this step of ``layer`` generates fresh examples: its first, then every ``refresh_every``-th."""
        return self.steps_taken[layer] % self.refresh_every == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Refresh this step's pool if due, then mix it into the batch."""
        if not self.is_active(trainer):
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
            self._log(trainer, pl_module, layer)
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
            self._injection = _Injection(layer, examples.to(inputs.device), inputs)

    def _remember(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the latest ``refresh_size`` clean rows (copies: the batch is about to be overwritten)."""
        self._recent.append((inputs.detach().clone(), labels.detach().clone()))
        while sum(rows.shape[0] for rows, _ in self._recent[1:]) >= self.refresh_size:
            self._recent.pop(0)

    def _check_classifier_inputs(self, module: nn.Module, args: tuple) -> None:
        """Before the training forward with pool rows at a hidden layer: the classifier must get the
        batch the callback mixed, rows in place (pool rows replace rows of the layer by position)."""
        injection = self._injection
        if injection is None or injection.checked or not module.training or not args or not isinstance(args[0], torch.Tensor):
            return
        injection.checked = True
        given, mixed = args[0], injection.batch_inputs
        remedy = ("hidden-layer pools replace the batch's last rows by position; augment in the data pipeline "
                  "(the dataset's transform, or the LightningModule's on_after_batch_transfer) instead of training_step")
        if given.shape[0] != mixed.shape[0]:
            raise ValueError(f"layer `{injection.layer}`: the classifier got {given.shape[0]} rows, the batch the callback "
                             f"mixed pool rows into had {mixed.shape[0]} (training_step changed the batch size); {remedy}")
        if given.shape[1:] != mixed.shape[1:]:
            raise ValueError(f"layer `{injection.layer}`: the classifier got inputs of shape {tuple(given.shape[1:])}, the "
                             f"batch had {tuple(mixed.shape[1:])} (training_step cropped or resized it); {remedy}")
        if given is mixed or given.dtype != mixed.dtype or torch.equal(given, mixed):
            return
        fingerprint = lambda rows: rows.detach().flatten(1).double().sum(1)  # noqa: E731 - one line, used twice
        if torch.equal(fingerprint(given).sort().values, fingerprint(mixed).sort().values):
            raise ValueError(f"layer `{injection.layer}`: the classifier got the batch's rows in another order "
                             f"(training_step shuffled them); {remedy}")

    def _end_of_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After the classifier's forward: batch norm back to normal; a pool that was never injected
        (the layer did not run in train mode) is an error, not a silent skip."""
        if self._separate is not None:
            self._separate.disarm()
        injection = self._injection
        if injection is not None and module.training and injection.checked:
            self._injection = None
            raise RuntimeError(f"layer `{injection.layer}` did not run in the classifier's training forward, so its "
                               "pool rows were not used; check that the forward pass reaches it")

    def _make_hook(self, layer: str):
        def replace_last_rows(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            injection = self._injection
            if injection is None or injection.layer != layer or not module.training:
                return None
            self._injection = None  # one shot: the training forward of this step
            activations = injection.activations
            rows, batch = activations.shape[0], injection.batch_inputs.shape[0]
            if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
                raise ValueError(f"layer `{layer}` returned {tuple(getattr(output, 'shape', ()))} in training, where the "
                                 f"batch the callback mixed had {batch} rows: the batch changed on its way to the layer")
            if output.shape[1:] != activations.shape[1:]:
                raise ValueError(f"layer `{layer}` returned rows of shape {tuple(output.shape[1:])} in training, its pool "
                                 f"holds {tuple(activations.shape[1:])}: the inputs changed shape on the way (a crop?)")
            if self._separate is not None:
                self._separate.arm(rows)  # batch norm above this layer: pool rows on the clean rows' statistics
            return torch.cat([output[:-rows], activations.to(output.dtype)], dim=0)  # no gradient path into the pool rows

        return replace_last_rows

    @torch.no_grad()
    def refresh(self, layer: str, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Attack ``inputs`` at ``layer`` on the current model (in eval mode) and add what the pooling
        policy keeps to the layer's pool, with the true labels."""
        classifier = self._classifier
        cut = self._cuts[layer]
        was_training = classifier.training
        classifier.eval()
        started = time.perf_counter()
        try:
            activations = cut.bottom(inputs)
            head = cut.head_for(inputs)
            rows = (head(activations).argmax(1) == labels).nonzero()[:, 0]
            activations, labels, head = activations[rows], labels[rows], head_for_rows(head, rows)
            if labels.numel():
                box = self._box_holding(layer, activations)
                result = self.attack(head, activations, labels, bounds=box, generator=self.generator)
                examples, kept = self.pooling(activations, result, box)
                self.pools[layer].add(examples[kept], labels[kept])
                success, distortion = result.success_rate, result.mean_distortion
            else:  # nothing attacked: no success rate to report
                success, distortion = float("nan"), float("nan")
            pool_error = self._pool_error(layer, cut, inputs)
        finally:
            classifier.train(was_training)
        seconds = time.perf_counter() - started
        self.seconds_generating += seconds
        self.stats[layer] = {
            "pool_size": float(len(self.pools[layer])),
            "generation_attacked": float(labels.numel()),
            "pool_error": pool_error,
            "generation_success": success,
            "generation_distortion": distortion,
            "generation_seconds": seconds,
        }

    def _box_holding(self, layer: str, activations: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The layer's box, widened where needed to hold the clean ``activations`` about to be attacked."""
        lower, upper = (_as_bound(bound, activations) for bound in self.boxes[layer])
        low, high = (torch.as_tensor(bound, dtype=activations.dtype, device=activations.device) for bound in (lower, upper))
        outside = (activations < low) | (activations > high)
        if not bool(outside.any()):
            return lower, upper
        self._warn_widened(layer, int(outside.sum()), self.boxes[layer])
        return torch.minimum(low, activations), torch.maximum(high, activations)

    def _pool_error(self, layer: str, cut: LayerCut, inputs: torch.Tensor, sample: int = 256) -> float:
        """Fraction of (a sample of) the pool that the current model still gets wrong."""
        pool = self.pools[layer]
        if len(pool) == 0:
            return float("nan")
        examples, labels = pool.sample(min(sample, len(pool)))
        examples = examples.to(inputs.device)
        # the cut is clean (nothing bypasses the layer), so any clean rows serve a replaying head
        head = cut.head_for(inputs[torch.arange(len(examples), device=inputs.device) % inputs.shape[0]])
        return float((head(examples).argmax(1).cpu() != labels.cpu()).float().mean())

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer: str) -> None:
        """Log the layer's last refresh: its first, then at most once every ``log_every_n_steps``
        steps (a ``self.log`` call costs milliseconds; refreshing every step would log six a step)."""
        last = self._logged_at.get(layer)
        if last is not None and trainer.global_step - last < max(1, trainer.log_every_n_steps):
            return
        self._logged_at[layer] = trainer.global_step
        for name, value in self.stats[layer].items():
            if value == value:  # skip NaN
                pl_module.log(f"adv/{layer}/{name}", value, on_step=True, on_epoch=False)

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        """Pools, counters, the recent clean rows and the random state."""
        return {
            "recent": [(inputs.cpu(), labels.cpu()) for inputs, labels in self._recent],
            "pools": {layer: pool.state_dict() for layer, pool in self.pools.items()},
            "steps_taken": dict(self.steps_taken),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls it after ``setup``, before training resumes)."""
        for layer, pool_state in state["pools"].items():
            self.pools[layer].load_state_dict(pool_state)
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


def _describe(box: Bounds) -> str:
    return "(" + ", ".join(f"{float(b):g}" if not isinstance(b, torch.Tensor) or b.numel() == 1 else "per-unit tensor"
                           for b in box) + ")"
