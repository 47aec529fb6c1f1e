"""``LayerwiseAdversarialTraining``: the paper's Section 4.2 as a drop-in Lightning callback.

Follow one batch: ``on_train_batch_start`` keeps the batch's clean rows in a small buffer of
recent rows, picks this step's layer k (:meth:`layer_for_step`), refreshes k's pool from the
recent clean rows when due (:meth:`should_refresh`), then overwrites the batch's last rows with
pool examples and their true labels. For ``"input"`` the rows are images; for a hidden layer a
forward hook on layer k replaces those rows of k's output with the pool's activations in every
training forward of the step, so they train only the layers above k: no gradient from them
reaches layer k or below, neither directly nor through the batch statistics of batch-norm layers
above k (:class:`~advtrain.batch_statistics.SeparateBatchStatistics`). A forward pre-hook on the
classifier first checks that the batch reached it unchanged. The model's forward then runs as
usual, and the logger receives each layer's pool size, pool error, generation success, distortion
and time. The first batch also resolves every layer
(:class:`~advtrain.classifier_layer.ClassifierLayer`): no extra pass over the loader.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from torch import nn
from typing_extensions import override

from advtrain.attacks import Attack, BoxLBFGS
from advtrain.attacks.inputs import head_for_rows, model_dtype
from advtrain.batch import BatchKeys, check_batch_keys, read_batch, shared_batch_keys
from advtrain.batch_statistics import SeparateBatchStatistics
from advtrain.box import Bounds, check_bounds
from advtrain.checks import check_count, check_finite
from advtrain.classifier_layer import ClassifierLayer, find_classifier
from advtrain.layers import INPUT, enclosing_modules
from advtrain.model_state import untouched
from advtrain.pool import AdversarialPool
from advtrain.pooling import PoolingPolicy, Successes

#: The default generator's settings: a cheap search (an adversarial example need not be minimal to
#: train on) towards a random wrong class, the paper's practice. docs/ gives their measured cost.
GENERATION_ATTACK = dict(loss="margin", search_steps=2, iterations=10, refine_steps=5, target="random")
#: A pool still empty after this many refreshes of its layer is warned about, with the reason.
EMPTY_REFRESHES_WARNED = 3


class _Injection:
    """Pool activations that replace the last rows of one layer's output in every training forward
    of this step (a ``training_step`` may run the classifier twice, as SAM does), with the batch they
    were mixed into (to check that each forward gets it unchanged)."""

    def __init__(self, layer: str, activations: torch.Tensor, batch_inputs: torch.Tensor) -> None:
        self.layer = layer
        self.activations = activations
        self.batch_inputs = batch_inputs
        self.in_forward = False  # a training forward of the classifier is running
        self.replaced = False  # the layer's rows were replaced in that forward
        self.forwards = 0  # training forwards of the classifier this step


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
    work. Hidden-layer pools replace rows of the layer's output by position, and the batch's
    labels at those rows: every training forward of the classifier in the step must get the batch
    as the callback left it. A ``training_step`` that changes it (mixup, noise, a crop, a shuffle),
    or that calls a submodule of the classifier directly (``self.net(x)`` with ``module=None``), is
    refused at the first step, saying what to do; one that runs the classifier twice on the batch
    (SAM, a consistency term on the same inputs) gets the pool rows in both passes. Input pools are
    ordinary batch rows, augmented and mixed like any other. Every module's mode, parameter flag
    and buffer is put back after each refresh, so frozen batch norm stays frozen.

    Raises:
        ValueError: bad settings, an empty or inverted box, a pooling policy the attack cannot
            serve (here); at the first batch: an unknown layer (the message lists the layers), a
            layer that cannot be cut or has no trainable parameter above it, a batch it cannot read,
            with non-finite inputs or whose tensors are slices of a larger tensor, a capacity below
            the rows mixed in, an input box that does not hold the inputs; during training: a batch
            changed between the callback and the classifier.

    Warns:
        UserWarning: a pool still empty after a few refreshes, with the reason (nothing classified
            right, nothing fooled, or the pooling policy dropped everything).

    Example::

        >>> from advtrain.attacks import FastGradient
        >>> from advtrain.pooling import EveryStep
        >>> callback = LayerwiseAdversarialTraining(["input", "layer2"], module="net",
        ...                                         attack=FastGradient(epsilon=0.036), pooling=EveryStep())
        >>> callback.layers, callback.attack
        (['input', 'layer2'], FastGradient(target='untargeted', epsilon=0.036, norm='rms'))

    Reference: Szegedy et al. (2013), Section 4.2.
    """

    def __init__(
        self,
        layers: Sequence[str] = (INPUT,),
        *,
        capacity: int = 4096,
        mix_fraction: float = 0.05,
        refresh_every: int = 192,
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
        if not isinstance(attack, Attack):
            instead = f"; pass an instance, e.g. attack={attack.__name__}()" if isinstance(attack, type) else ""
            raise ValueError(f"attack must be an advtrain Attack instance, got {attack!r}{instead}")
        pooling = pooling if pooling is not None else Successes()
        if isinstance(pooling, type) or not callable(pooling) or not callable(getattr(pooling, "check", None)):
            instead = f"; pass an instance, e.g. pooling={pooling.__name__}()" if isinstance(pooling, type) else ""
            raise ValueError(f"pooling must be a pooling policy instance (Successes(), WithinBudget(...), EveryStep()), "
                             f"got {pooling!r}{instead}")
        pooling.check(attack)
        unknown_bounds = [name for name in (bounds or {}) if name not in layers]
        if unknown_bounds:
            raise ValueError(f"bounds are given for {', '.join(map(repr, unknown_bounds))}, which is not among the "
                             f"layers with pools {layers!r}")
        bounds = {name: check_bounds(box, name=f"bounds for layer `{name}`") for name, box in (bounds or {}).items()}
        self.layers = layers
        self.capacity = capacity
        self.mix_fraction = mix_fraction
        self.refresh_every = refresh_every
        self.refresh_size = refresh_size
        self.attack = attack
        self.pooling = pooling
        self.module = module
        self.bounds_override = bounds
        self.batch_keys = check_batch_keys(batch_keys)
        self.seed = seed
        self.pools = {layer: AdversarialPool(capacity, device=pool_device, seed=seed + index)
                      for index, layer in enumerate(layers)}
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_taken = {layer: 0 for layer in layers}  # adversarial steps per layer
        self.empty_refreshes = {layer: 0 for layer in layers}  # refreshes in a row that left the pool empty
        self.stats: dict[str, dict[str, float]] = {}  # the last refresh of each layer
        self.seconds_generating = 0.0  # in this process, all refreshes together
        self._classifier: nn.Module | None = None
        self._keys: BatchKeys | None = self.batch_keys
        self._rank = 0
        self._sites: dict[str, ClassifierLayer] = {}  # each layer resolved on the first batch
        self._hooks: list[Any] = []
        self._separate: SeparateBatchStatistics | None = None
        self._injection: _Injection | None = None
        self._logged_at: dict[str, int] = {}  # the global step each layer's statistics were last logged
        self._recent: list[tuple[torch.Tensor, torch.Tensor]] = []  # recent clean (inputs, labels)

    @property
    def state_key(self) -> str:
        """Distinguishes instances with different layers in one checkpoint."""
        return self._generate_state_key(layers=tuple(self.layers), capacity=self.capacity)

    # ---- setup: everything that needs the model, checked before the first step ----

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the classifier and the batch keys; seed each rank."""
        if stage != "fit":
            return
        self._classifier = find_classifier(pl_module, self.module)
        self._keys = shared_batch_keys(trainer, self.batch_keys)
        self._sites = {}  # resolved again on this fit's first batch
        self._rank = trainer.global_rank
        if self._rank:  # each rank draws its own examples (a checkpoint restored later restores each rank's own)
            self._seed_rank(self._rank)

    def _seed_rank(self, rank: int) -> None:
        self.generator.manual_seed(self.seed + 1000 * rank)
        for index, pool in enumerate(self.pools.values()):
            pool.generator.manual_seed(self.seed + index + 1000 * rank)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._separate is not None:
            self._separate.remove()
            self._separate = None
        self._injection = None

    def prepare(self, pl_module: pl.LightningModule, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """On the first batch training sees (no extra pass over the loader): check its format and the
        capacity, resolve every layer (:class:`~advtrain.classifier_layer.ClassifierLayer`: cut, box),
        refuse a layer with nothing trainable above it, hook the hidden layers."""
        check_writable(inputs, labels)
        if inputs.dtype.is_floating_point:
            check_finite("the batch's inputs", inputs)
        mixed = self.rows_to_mix(inputs.shape[0])
        if round(self.mix_fraction * inputs.shape[0]) < 1:
            warnings.warn(f"mix_fraction {self.mix_fraction} of a batch of {inputs.shape[0]} rows rounds to no row; one "
                          f"row of each batch ({1 / inputs.shape[0]:.1%}) is mixed in instead", stacklevel=2)
        if mixed > self.capacity:
            raise ValueError(f"capacity {self.capacity} is below the {mixed} rows mixed into each batch of "
                             f"{inputs.shape[0]} (mix_fraction {self.mix_fraction}); raise capacity or lower mix_fraction")
        classifier = self._classifier if self._classifier is not None else find_classifier(pl_module, self.module)
        self._classifier = classifier
        inputs = self._as_model_input(inputs)
        self._check_logits(classifier, inputs)
        sites = {layer: ClassifierLayer(classifier, layer, inputs, bounds=self.bounds_override.get(layer))
                 for layer in self.layers}
        for layer, site in sites.items():
            if not site.trainable_above(inputs):
                raise ValueError(f"layer `{layer}`: no trainable parameter lies above it (the logits, or every layer "
                                 "above it frozen), so its pool would train nothing; choose a lower layer")
        self._sites = sites
        for hook in self._hooks:
            hook.remove()
        self._hooks = [classifier.register_forward_pre_hook(self._check_classifier_inputs),
                       classifier.register_forward_hook(self._end_of_forward)]
        self._hooks += [classifier.get_submodule(layer).register_forward_hook(self._make_hook(layer))
                        for layer in self.layers if layer != INPUT]
        if self._separate is None and any(layer != INPUT for layer in self.layers):
            self._separate = SeparateBatchStatistics(classifier)

    def _as_model_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """Floating inputs in the classifier's precision: a batch of fp16 images that
        ``training_step`` casts before its forward is attacked as the model sees it."""
        dtype = model_dtype(self._classifier)
        return inputs.to(dtype) if dtype is not None and inputs.dtype.is_floating_point and inputs.dtype != dtype else inputs

    def _check_logits(self, classifier: nn.Module, inputs: torch.Tensor) -> None:
        """The classifier must return logits ``(N, C)``: the pools attack it and read its argmax.

        Raises:
            ValueError: another output (a tuple, a dict, a wrong shape), naming it and what to do.
        """
        with untouched(classifier), torch.no_grad():
            output = classifier(inputs)
        if isinstance(output, torch.Tensor) and output.ndim == 2 and output.shape[0] == inputs.shape[0]:
            return
        got = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else \
            f"a {type(output).__name__}" + (f" with keys {', '.join(map(str, output))}" if isinstance(output, Mapping) else "")
        raise ValueError(f"the classifier ({self._classifier_name()}) returns {got}; the pools need logits (N, C) from it. "
                         "Pass module= naming the submodule that returns logits, or wrap the network so that its "
                         "forward returns them")

    @property
    def boxes(self) -> dict[str, Bounds]:
        """Each layer's box, once the first batch has resolved the layers."""
        return {layer: site.box for layer, site in self._sites.items()}

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

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Refresh this step's pool if due, then mix it into the batch (:meth:`_mix_into`)."""
        self._mix_into(trainer, pl_module, batch)

    # The hooks Lightning calls delegate to undecorated methods: mutmut (docs/mutation-testing.md)
    # leaves decorated functions unmutated.
    def _mix_into(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._injection = None
        inputs, labels = self.read_batch(batch)
        if inputs.shape[0] == 0:  # an empty batch (the end of a stream): nothing to mix into or learn from
            return
        if not self._sites:
            self.prepare(pl_module, inputs, labels)
        if not self.is_active(trainer):
            return
        layer = self.layer_for_step(trainer.global_step)
        mixed = self.rows_to_mix(inputs.shape[0])
        clean = inputs.shape[0] - mixed if mixed < inputs.shape[0] else inputs.shape[0]  # rows the pool leaves alone
        self._remember(inputs[:clean], labels[:clean])
        if self.should_refresh(layer):
            newest = slice(-self.refresh_size, None)  # the chunks kept may hold more rows than a refresh attacks
            recent_inputs = self._as_model_input(torch.cat([rows for rows, _ in self._recent])[newest].to(inputs.device))
            recent_labels = torch.cat([rows for _, rows in self._recent])[newest].to(labels.device)
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

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """A hidden-layer pool that no training forward used is an error, not a silent skip."""
        injection, self._injection = self._injection, None
        if injection is not None and injection.forwards == 0:
            raise RuntimeError(f"layer `{injection.layer}`'s pool rows were mixed into the batch, but no training forward "
                               f"of the classifier ({self._classifier_name()}) ran this step, so they trained nothing while "
                               "their labels replaced the batch's; call the classifier in training_step, or name the "
                               "submodule training_step calls with module=...")

    def _classifier_name(self) -> str:
        return "the LightningModule's forward" if self.module is None else f"module `{self.module}`"

    def _remember(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the latest ``refresh_size`` clean rows (copies: the batch is about to be overwritten)."""
        self._recent.append((inputs.detach().clone(), labels.detach().clone()))
        while sum(rows.shape[0] for rows, _ in self._recent[1:]) >= self.refresh_size:
            self._recent.pop(0)

    def _check_classifier_inputs(self, module: nn.Module, args: tuple) -> None:
        """Before each training forward with pool rows at a hidden layer: the classifier must get the
        batch the callback mixed, unchanged (pool rows replace rows of the layer by position, and the
        batch's labels were replaced at those rows)."""
        injection = self._injection
        if injection is None or not module.training or not args or not isinstance(args[0], torch.Tensor):
            return
        given, mixed = args[0], injection.batch_inputs
        remedy = ("hidden-layer pools replace the batch's last rows by position and their labels with the pool's; "
                  "augment or mix in the data pipeline (the dataset's transform, or the LightningModule's "
                  "on_after_batch_transfer) or inside the classifier module, not in training_step")
        if given.shape[0] != mixed.shape[0]:
            raise ValueError(f"layer `{injection.layer}`: the classifier got {given.shape[0]} rows, the batch the callback "
                             f"mixed pool rows into had {mixed.shape[0]} (training_step changed the batch size); {remedy}")
        if given.shape[1:] != mixed.shape[1:]:
            raise ValueError(f"layer `{injection.layer}`: the classifier got inputs of shape {tuple(given.shape[1:])}, the "
                             f"batch had {tuple(mixed.shape[1:])} (training_step cropped or resized it); {remedy}")
        if not (given is mixed or torch.equal(given, mixed.to(given.dtype))):
            fingerprint = lambda rows: rows.detach().flatten(1).double().sum(1)  # noqa: E731 - one line, used twice
            shuffled = torch.equal(fingerprint(given).sort().values, fingerprint(mixed).sort().values)
            change = "its rows in another order (training_step shuffled them)" if shuffled else \
                "other values than the batch's (training_step changed them: mixup, noise, normalisation?)"
            raise ValueError(f"layer `{injection.layer}`: the classifier got {change}; {remedy}")
        injection.in_forward, injection.replaced = True, False

    def _end_of_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After each classifier forward: batch norm back to normal; a forward that did not reach the
        layer (it did not run in train mode) is an error, not a silent skip."""
        if self._separate is not None:
            self._separate.disarm()
        injection = self._injection
        if injection is None or not injection.in_forward:
            return
        injection.in_forward = False
        injection.forwards += 1
        if not injection.replaced:
            self._injection = None
            raise RuntimeError(f"layer `{injection.layer}` did not run in the classifier's training forward, so its "
                               "pool rows were not used; check that the forward pass reaches it")

    def _make_hook(self, layer: str):
        def replace_last_rows(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            injection = self._injection
            if injection is None or injection.layer != layer or not module.training:
                return None
            if not injection.in_forward:
                enclosing = enclosing_modules(layer) if self.module is None else []
                hint = f" (e.g. module='{enclosing[-1]}')" if enclosing else ""
                raise ValueError(f"layer `{layer}` ran in a training forward that did not go through the classifier "
                                 f"({self._classifier_name()}), so the callback cannot check that the batch reached it "
                                 f"unchanged: training_step calls a submodule directly? Pass that submodule as "
                                 f"module=...{hint}, with layer names inside it")
            activations = injection.activations
            rows, batch = activations.shape[0], injection.batch_inputs.shape[0]
            if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
                raise ValueError(f"layer `{layer}` returned {tuple(getattr(output, 'shape', ()))} in training, where the "
                                 f"batch the callback mixed had {batch} rows: the batch changed on its way to the layer")
            if output.shape[1:] != activations.shape[1:]:
                raise ValueError(f"layer `{layer}` returned rows of shape {tuple(output.shape[1:])} in training, its pool "
                                 f"holds {tuple(activations.shape[1:])}: the inputs changed shape on the way (a crop?)")
            injection.replaced = True
            if self._separate is not None:
                self._separate.arm(rows)  # batch norm above this layer: pool rows on the clean rows' statistics
            return torch.cat([output[:-rows], activations.to(output.dtype)], dim=0)  # no gradient path into the pool rows

        return replace_last_rows

    def refresh(self, layer: str, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Attack ``inputs`` at ``layer`` on the current model (as in eval mode, every mode and buffer
        put back afterwards): the rows it classifies right, or every row where the pooling policy
        says ``misclassified``; add what the policy keeps to the layer's pool, with the true labels."""
        site = self._sites[layer]
        started = time.perf_counter()
        with torch.no_grad(), untouched(self._classifier):
            activations = site.bottom(inputs)
            head = site.head_for(inputs)
            if getattr(self.pooling, "misclassified", False):  # adversarial training's practice: every row
                rows = torch.arange(labels.shape[0], device=labels.device)
            else:  # the rows the model gets right: a minimal perturbation of a wrong one is nothing
                rows = (head(activations).argmax(1) == labels).nonzero()[:, 0]
            activations, labels, head = activations[rows], labels[rows], head_for_rows(head, rows)
            kept = 0
            if labels.numel():
                box = site.box_holding(activations)
                result = self.attack(head, activations, labels, bounds=box, generator=self.generator)
                examples, keep = self.pooling(activations, result, box)
                self.pools[layer].add(examples[keep], labels[keep])
                success, distortion, kept = result.success_rate, result.mean_distortion, int(keep.sum())
            else:  # nothing attacked: no success rate to report
                success, distortion = float("nan"), float("nan")
            pool_error = self._pool_error(layer, inputs)
        seconds = time.perf_counter() - started
        self.seconds_generating += seconds
        self.stats[layer] = {
            "pool_size": float(len(self.pools[layer])),
            "generation_attacked": float(labels.numel()),
            "generation_kept": float(kept),
            "pool_error": pool_error,
            "generation_success": success,
            "generation_distortion": distortion,
            "generation_seconds": seconds,
        }
        self._watch_empty(layer)

    def _watch_empty(self, layer: str) -> None:
        """Warn, once per layer, when its pool is still empty after :data:`EMPTY_REFRESHES_WARNED`
        refreshes: training is then plain training, and the reason is said."""
        if len(self.pools[layer]):
            self.empty_refreshes[layer] = 0
            return
        self.empty_refreshes[layer] += 1
        if self.empty_refreshes[layer] != EMPTY_REFRESHES_WARNED:
            return
        stats = self.stats[layer]
        if stats["generation_attacked"] == 0:
            reason = "no recent training row was classified correctly, so none was attacked"
        elif stats["generation_success"] == 0:
            reason = f"the attack {self.attack!r} fooled the model on none of the {int(stats['generation_attacked'])} rows attacked"
        else:
            reason = (f"the pooling policy {self.pooling!r} dropped every example the attack {self.attack!r} found "
                      f"(e.g. a budget below the attack's own step)")
        warnings.warn(f"layer `{layer}`: its pool is still empty after {EMPTY_REFRESHES_WARNED} refreshes, so training "
                      f"so far is plain training: {reason}", stacklevel=2)

    def _pool_error(self, layer: str, inputs: torch.Tensor, sample: int = 256) -> float:
        """Fraction of (a sample of) the pool that the current model still gets wrong."""
        pool = self.pools[layer]
        if len(pool) == 0:
            return float("nan")
        examples, labels = pool.sample(min(sample, len(pool)))
        examples = examples.to(inputs.device)
        # the cut is clean (nothing bypasses the layer), so any clean rows serve a replaying head
        head = self._sites[layer].head_for(inputs[torch.arange(len(examples), device=inputs.device) % inputs.shape[0]])
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

    def _own_state(self) -> dict[str, Any]:
        return {
            "recent": [(inputs.cpu(), labels.cpu()) for inputs, labels in self._recent],
            "pools": {layer: pool.state_dict() for layer, pool in self.pools.items()},
            "steps_taken": dict(self.steps_taken),
            "empty_refreshes": dict(self.empty_refreshes),
            "generator": self.generator.get_state(),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        """Pools, counters, the recent clean rows and the random state of every rank: under DDP each
        rank keeps its own, gathered here (Lightning asks every rank, and rank 0 writes the file)."""
        own = self._own_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
            return {"ranks": ranks}
        return {"ranks": [own]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each rank its own state (Lightning calls it after ``setup``). A
        rank the checkpoint has no state for (more ranks than when it was written) keeps its fresh
        pools and its own seed, with a warning."""
        self._restore(state_dict)

    def _restore(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"] if "ranks" in state_dict else [state_dict]
        if self._rank >= len(ranks):
            warnings.warn(f"the checkpoint holds pools of {len(ranks)} rank(s); rank {self._rank} starts with empty pools",
                          stacklevel=3)  # the caller of load_state_dict
            return
        state = ranks[self._rank]
        for layer, pool_state in state["pools"].items():
            self.pools[layer].load_state_dict(pool_state)
        self.steps_taken.update(state["steps_taken"])
        self.empty_refreshes.update(state.get("empty_refreshes", {}))
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
