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

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from advtrain.attacks import AttackResult, BoxLBFGS, FastGradient
from advtrain.attacks.inputs import head_for_rows
from advtrain.attacks.targets import POLICIES, TargetPolicy
from advtrain.batch import BatchKeys, check_batch_keys, read_batch, shared_batch_keys
from advtrain.batch_statistics import SeparateBatchStatistics
from advtrain.checks import check_count
from advtrain.layers import (INPUT, UNBOUNDED, Bounds, LayerCut, LayerCutError, check_layer, cut_at, enclosing_modules,
                             known_bounds, layer_names)
from advtrain.pool import AdversarialPool

#: Attack settings for generation: far cheaper than the evaluation defaults (an adversarial example
#: need not be minimal to train on) with the margin loss. On FC100-100-10 they find an example for
#: every one of 256 rows at each layer in 0.1 to 0.3 s, with distortion within 10% of the full search.
GENERATION_ATTACK = dict(loss="margin", search_steps=2, iterations=10)


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
        batch_keys: ``(inputs, labels)`` keys of a dict batch (default: found by their usual
            names, or taken from another advtrain callback in the Trainer; see :mod:`advtrain.batch`).
        bounds: per-layer boxes ``{layer: (low, high)}`` (scalars or tensors of one example's shape)
            overriding the defaults: ``(0, 1)`` for ``"input"``, the range a layer's type or last
            operation implies (sigmoid, tanh, ReLU, a block ending in a ReLU...), else no bound.
            Clean activations outside a layer's box (bounds set too tight) widen it for the rows
            attacked, with a warning; the input box must hold the first batch.
        pool_device: where pools live (``"cpu"`` keeps accelerator memory free).
        seed: seeds layer choice, pool replacement and targets (offset by the rank under DDP).

    A layer is any named submodule of the classifier that runs once per forward pass (a ResNet
    stage ``layer2``, one block ``layer2.0``, ``encoder.layers.0`` of a transformer). Tensors that
    bypass the layer (a skip connection around it) would carry the pool rows' gradient below it,
    so such a layer is refused, with the enclosing modules that can be used instead. Hidden-layer
    pools replace rows of the layer's output by position: the batch must reach the classifier
    as the callback saw it. Augmentation that changes its size, shape or order inside
    ``training_step`` is refused at the first step; augment in the data pipeline instead (input
    pools are unaffected: their rows are ordinary batch rows, augmented like any other).

    Raises:
        ValueError: bad settings (here), or before the first step: an unknown layer (the message
            lists the layers), a layer that cannot be cut (run twice, or bypassed by a skip
            connection), a batch it cannot read or whose tensors are slices of a larger tensor
            (writing pool rows into them would overwrite it), a capacity below the rows mixed in,
            an input box that does not hold the inputs; during training: a batch changed between
            the callback and the classifier.

    Example::

        >>> import torchvision
        >>> callback = LayerwiseAdversarialTraining(["input", "layer2", "layer3"], module="net")
        >>> callback.layers
        ['input', 'layer2', 'layer3']

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
        batch_keys: Sequence[str] | None = None,
        bounds: Mapping[str, Bounds] | None = None,
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
        unknown_bounds = [name for name in (bounds or {}) if name not in layers]
        if unknown_bounds:
            raise ValueError(f"bounds are given for {', '.join(map(repr, unknown_bounds))}, which is not among the "
                             f"layers with pools {layers!r}")
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
        self.batch_keys = check_batch_keys(batch_keys)
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
        self._keys: BatchKeys | None = self.batch_keys
        self._cuts: dict[str, LayerCut] = {}
        self._hooks: list[Any] = []
        self._separate: SeparateBatchStatistics | None = None
        self._injection: _Injection | None = None
        self._widened: set[str] = set()  # layers whose box was widened (warned once)
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
        """Attack ``inputs`` at ``layer`` on the current model (in eval mode) and add the successes
        within ``max_distortion`` (or, with ``pool_failures``, every step) to the layer's pool, with
        their true labels."""
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
            self.attack.seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
            if labels.numel():
                box = self._box_holding(layer, activations)
                result = self.attack(head, activations, labels, target=self.target, bounds=box)
                examples, kept = self._within_budget(activations, result, box)
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

    def _log(self, pl_module: pl.LightningModule, layer: str) -> None:
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
