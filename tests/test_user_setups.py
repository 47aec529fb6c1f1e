"""The callback in the training setups users have, with pools at the input and at a hidden layer:
frozen batch norm, a frozen backbone, a module overriding ``train()``, dropout, a read-once stream,
a ``training_step`` that runs the classifier twice, mixes rows, or calls ``self.net`` with
``module=None``. Each checks that what the user set is what the model has after fit, and that
every row trains on its own label, or that the case is refused with a clear error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from advtrain.attacks import BoxLBFGS, FastGradient
from advtrain.callbacks import LayerwiseAdversarialTraining
from advtrain.pooling import EveryStep, WithinBudget
from tests.real_models import PlainModule, bn_convnet, images, loader, pretrained, resnet18

POOLS = [["input"], ["layer3"]]  # an input pool and a hidden-layer pool of resnet18
FAST = dict(attack=FastGradient(epsilon=0.05), pooling=EveryStep())  # cheap generation, every row pooled


def trainer_for(tmp_path: Path, callbacks: list, **settings) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **settings)


def batch_norm_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in net.named_buffers()}


class FrozenBatchNorm(PlainModule):
    """Fine-tuning the usual way: every batch-norm layer put in eval mode at each epoch start."""

    def on_train_epoch_start(self) -> None:
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


@pytest.mark.parametrize("layers", POOLS, ids=["input", "layer3"])
def test_frozen_batch_norm_keeps_every_running_statistic_bit_for_bit(tmp_path, layers) -> None:
    net = resnet18()
    before = batch_norm_state(net)
    callback = LayerwiseAdversarialTraining(layers, module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback], max_epochs=2).fit(FrozenBatchNorm(net), loader(*images(32)))
    assert len(callback.pools[layers[0]]) > 0 and sum(callback.steps_taken.values()) == 4
    after = batch_norm_state(net)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"{len(changed)} batch-norm buffers changed, e.g. {changed[:3]}"
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))


class KeepsBatchNormFrozen(nn.Module):
    """A network that overrides ``train()`` to keep its batch norm in eval mode, and counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_convnet()
        self.train_calls = 0

    def train(self, mode: bool = True) -> "KeepsBatchNormFrozen":
        self.train_calls += 1
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("layers", [["input"], ["body.5"]], ids=["input", "hidden"])
def test_a_module_overriding_train_is_never_asked_to_change_its_mode(tmp_path, layers) -> None:
    calls = {}
    for name, callbacks in (("plain", []), ("pools", [LayerwiseAdversarialTraining(layers, module="net", refresh_every=1,
                                                                                    mix_fraction=0.25, **FAST)])):
        net = pretrained(KeepsBatchNormFrozen(), *images(32))
        net.train()
        before = batch_norm_state(net)
        net.train_calls = 0
        trainer_for(tmp_path / name, callbacks, max_steps=3).fit(PlainModule(net), loader(*images(32)))
        calls[name] = net.train_calls
        assert all(torch.equal(before[key], value) for key, value in batch_norm_state(net).items())
    assert len(callbacks[0].pools[layers[0]]) > 0
    assert calls["pools"] == calls["plain"]  # the callback itself never called train()


@pytest.mark.parametrize("layers", POOLS, ids=["input", "layer3"])
def test_a_frozen_backbone_stays_frozen_and_only_the_head_trains(tmp_path, layers) -> None:
    net = resnet18()
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(name.startswith("fc."))
    frozen = {name: p.clone() for name, p in net.named_parameters() if not p.requires_grad}
    head = net.fc.weight.clone()
    callback = LayerwiseAdversarialTraining(layers, module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback], max_steps=3).fit(PlainModule(net), loader(*images(32)))
    assert len(callback.pools[layers[0]]) > 0
    assert all(torch.equal(p, frozen[name]) for name, p in net.named_parameters() if name in frozen)
    assert [name for name, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert not torch.equal(net.fc.weight, head)


class RecordModes(pl.Callback):
    """After the pools callback's refresh (callbacks run in list order): every module's mode."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append({name: module.training for name, module in pl_module.named_modules()})


def dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))


@pytest.mark.parametrize("layers", [["input"], ["2"]], ids=["input", "hidden"])
def test_dropout_is_back_in_train_mode_after_every_refresh(tmp_path, layers) -> None:
    net = pretrained(dropout_net(), *images(32))
    record = RecordModes()
    callback = LayerwiseAdversarialTraining(layers, module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback, record], max_steps=3).fit(PlainModule(net), loader(*images(32)))
    assert len(callback.pools[layers[0]]) > 0 and len(record.modes) == 3
    assert all(all(modes.values()) for modes in record.modes)  # dropout (and all else) in train mode, as the user set


class ReadOnce(IterableDataset):
    """A stream that can be read once: a second pass raises, as a socket or a generator would."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 8) -> None:
        self.inputs, self.labels, self.batch_size, self.opened = inputs, labels, batch_size, 0

    def __iter__(self):
        self.opened += 1
        if self.opened > 1:
            raise RuntimeError("this stream can be read once")
        for start in range(0, len(self.labels), self.batch_size):
            yield self.inputs[start:start + self.batch_size].clone(), self.labels[start:start + self.batch_size].clone()


class CountRows(PlainModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.rows_trained = 0

    def training_step(self, batch, batch_idx):
        self.rows_trained += len(batch[1])
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("layers", [["input"], ["5"]], ids=["input", "hidden"])
def test_a_read_once_stream_trains_on_every_streamed_row(tmp_path, layers) -> None:
    stream = ReadOnce(*images(48))
    module = CountRows(pretrained(bn_convnet(), *images(48)))
    callback = LayerwiseAdversarialTraining(layers, module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(stream, batch_size=None))
    assert stream.opened == 1 and module.rows_trained == 48
    assert callback.steps_taken[layers[0]] == 6 and len(callback.pools[layers[0]]) > 0


def test_adding_the_callback_leaves_an_unseeded_shuffled_loader_in_its_order(tmp_path) -> None:
    orders = {}
    for name in ("plain", "pools"):
        seen: list[int] = []

        class Record(PlainModule):
            def training_step(self, batch, batch_idx):
                seen.append(int(batch[0][0, 0, 0, 0].mul(1e6)))  # the first (clean) row names the batch's order
                return super().training_step(batch, batch_idx)

        callbacks = [LayerwiseAdversarialTraining(["input"], module="net", refresh_every=1, **FAST)] if name == "pools" else []
        torch.manual_seed(123)
        trainer_for(tmp_path / name, callbacks, max_epochs=2).fit(Record(bn_convnet()), loader(*images(48), shuffle=True))
        orders[name] = seen
    assert len(orders["plain"]) == 6 and orders["plain"] == orders["pools"]


class TwoPasses(PlainModule):
    """A training_step that runs the classifier twice on the batch (SAM, or a consistency term), and
    records what the layer above the pool's layer got in each pass."""

    def __init__(self, net: nn.Module, above: str) -> None:
        super().__init__(net)
        self.seen: list[torch.Tensor] = []
        net.get_submodule(above).register_forward_pre_hook(lambda module, args: self.seen.append(args[0].detach().clone()))

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        self.seen.clear()
        first = nn.functional.cross_entropy(self.net(inputs), labels)
        second = nn.functional.cross_entropy(self.net(inputs), labels)
        self.passes = list(self.seen)
        return first + second


def test_a_second_forward_in_training_step_gets_the_pool_rows_too(tmp_path) -> None:
    net = pretrained(bn_convnet(), *images(32))
    module = TwoPasses(net, above="6")
    callback = LayerwiseAdversarialTraining(["5"], module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback], max_steps=1).fit(module, loader(*images(32)))
    first, second = module.passes
    pool = callback.pools["5"].examples[: len(callback.pools["5"])]
    for seen in (first, second):  # the last 4 rows of each pass are pool activations, the rest are not
        assert all(any(torch.equal(row, entry) for entry in pool) for row in seen[-4:])
        assert not any(any(torch.equal(row, entry) for entry in pool) for row in seen[:-4])


def _mixup(x, y):
    order = torch.arange(len(y)).roll(1)
    return 0.7 * x + 0.3 * x[order], y  # the labels would be mixed alike in the loss


def _noise(x, y):
    return x + 0.01 * torch.randn_like(x), y


@pytest.mark.parametrize("augment", [_mixup, _noise], ids=["mixup", "noise"])
def test_changing_the_batch_in_training_step_is_refused_with_hidden_pools(tmp_path, augment) -> None:
    callback = LayerwiseAdversarialTraining(["5"], module="net", mix_fraction=0.25, **FAST)
    with pytest.raises(ValueError, match=r"layer `5`: the classifier got other values than the batch's \(training_step "
                                         r"changed them: mixup, noise, normalisation\?\).*on_after_batch_transfer"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(PlainModule(pretrained(bn_convnet(), *images(32)),
                                                                       augment=augment), loader(*images(32)))


def test_mixup_in_training_step_with_input_pools_mixes_pool_rows_like_any_row(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="net", mix_fraction=0.25, refresh_every=1, **FAST)
    trainer_for(tmp_path, [callback], max_steps=2).fit(PlainModule(pretrained(bn_convnet(), *images(32)), augment=_mixup),
                                                     loader(*images(32)))
    assert len(callback.pools["input"]) > 0


class CallsNetDirectly(PlainModule):
    """The LightningModule's forward is never called: training_step calls ``self.net``."""

    def forward(self, x):
        return self.net(x)


def test_module_none_with_self_net_called_directly_is_refused_at_a_hidden_layer(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["net.5"], mix_fraction=0.25, **FAST)
    with pytest.raises(ValueError, match=r"layer `net.5` ran in a training forward that did not go through the classifier "
                                         r"\(the LightningModule's forward\).*module='net'"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(CallsNetDirectly(pretrained(bn_convnet(), *images(32))),
                                                           loader(*images(32)))


def test_module_none_with_input_pools_trains(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], mix_fraction=0.25, refresh_every=1, **FAST)
    trainer_for(tmp_path, [callback], max_steps=2).fit(CallsNetDirectly(pretrained(bn_convnet(), *images(32))),
                                                       loader(*images(32)))
    assert len(callback.pools["input"]) > 0


class SkipsTheClassifier(PlainModule):
    """A training_step that never runs the network in training (a bug the callback must not hide)."""

    def training_step(self, batch, batch_idx):
        return sum(p.sum() for p in self.parameters()) * 0.0


def test_pool_rows_that_no_training_forward_used_are_an_error(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["5"], module="net", mix_fraction=0.25, **FAST)
    with pytest.raises(RuntimeError, match=r"layer `5`'s pool rows were mixed into the batch, but no training forward of "
                                           r"the classifier \(module `net`\) ran this step"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(SkipsTheClassifier(pretrained(bn_convnet(), *images(32))),
                                                           loader(*images(32)))


# ---- no silent no-op ----

def test_a_pool_its_policy_empties_warns_with_the_reason(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="net", refresh_every=1, attack=FastGradient(epsilon=0.1),
                                            pooling=WithinBudget(0.01))
    with pytest.warns(UserWarning, match=r"layer `input`: its pool is still empty after 3 refreshes, so training so far is "
                                         r"plain training: the pooling policy WithinBudget\(epsilon=0.01.*dropped every"):
        trainer_for(tmp_path, [callback], max_steps=4).fit(PlainModule(pretrained(bn_convnet(), *images(32))),
                                                           loader(*images(32)))
    assert len(callback.pools["input"]) == 0


def test_a_pool_with_nothing_classified_right_warns_with_that_reason(tmp_path) -> None:
    inputs, labels = images(32)
    callback = LayerwiseAdversarialTraining(["input"], module="net", refresh_every=1, **FAST)
    with pytest.warns(UserWarning, match=r"no recent training row was classified correctly"):
        trainer_for(tmp_path, [callback], max_steps=3).fit(PlainModule(pretrained(bn_convnet(), inputs, labels), lr=0.0),
                                                           loader(inputs, 1 - labels))


def test_no_warning_where_pools_fill(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="net", refresh_every=1, **FAST)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pool is still empty.*")
        trainer_for(tmp_path, [callback], max_steps=4).fit(PlainModule(pretrained(bn_convnet(), *images(32))),
                                                           loader(*images(32)))


@pytest.mark.parametrize(("bounds", "message"), [
    ({"5": (1.0, 0.0)}, r"bounds for layer `5` \(1, 0\) have lower > upper somewhere"),
    ({"5": (0.5, 0.5)}, r"bounds for layer `5` \(0.5, 0.5\) leave no room"),
    ({"5": 1.0}, r"bounds for layer `5` must be a pair \(lower, upper\)"),
    ({"5": (0.0, float("nan"))}, r"bounds for layer `5` hold NaN"),
], ids=["inverted", "point", "scalar", "nan"])
def test_an_empty_inverted_or_malformed_box_is_refused_when_built(bounds, message) -> None:
    with pytest.raises(ValueError, match=message):
        LayerwiseAdversarialTraining(["5"], module="net", bounds=bounds)


@pytest.mark.parametrize(("layer", "freeze"), [("11", False), ("10", True)], ids=["logits", "frozen-head"])
def test_a_pool_with_no_trainable_parameter_above_is_refused_before_the_first_step(tmp_path, layer, freeze) -> None:
    net = pretrained(bn_convnet(), *images(32))
    if freeze:
        net[11].requires_grad_(False)
    module = PlainModule(net)
    before = {name: p.clone() for name, p in net.named_parameters()}
    callback = LayerwiseAdversarialTraining([layer], module="net", **FAST)
    with pytest.raises(ValueError, match=rf"layer `{layer}`: no trainable parameter lies above it"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(module, loader(*images(32)))
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())  # refused before any step


def test_non_finite_pixels_are_refused_before_the_first_step(tmp_path) -> None:
    inputs, labels = images(32)
    inputs[3, 0, 0, 0] = float("nan")
    callback = LayerwiseAdversarialTraining(["input"], module="net", **FAST)
    with pytest.raises(ValueError, match=r"the batch's inputs holds 1 non-finite values"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(PlainModule(bn_convnet()), loader(inputs, labels))


@pytest.mark.parametrize(("attack", "pooling", "message"), [
    (BoxLBFGS, None, r"attack must be an advtrain Attack instance, got <class .*BoxLBFGS'>; pass an instance, e.g. "
                     r"attack=BoxLBFGS\(\)"),
    (None, "successes", r"pooling must be a pooling policy instance .* got 'successes'"),
    (None, EveryStep, r"pooling must be a pooling policy instance .*; pass an instance, e.g. pooling=EveryStep\(\)"),
], ids=["attack-class", "pooling-string", "pooling-class"])
def test_classes_and_strings_for_instances_are_refused_when_built(attack, pooling, message) -> None:
    with pytest.raises(ValueError, match=message):
        LayerwiseAdversarialTraining(attack=attack, pooling=pooling)


def test_an_attack_without_a_generator_draws_from_torch_s_global_generator() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    inputs, labels = torch.rand(64, 6), torch.randint(0, 4, (64,))
    attack = FastGradient(epsilon=0.1, target="random", random_start=True)
    first, second = attack(model, inputs, labels), attack(model, inputs, labels)
    assert not torch.equal(first.target, second.target)  # not a fixed seed reused call after call
    torch.manual_seed(5)
    third = attack(model, inputs, labels)
    torch.manual_seed(5)
    assert torch.equal(attack(model, inputs, labels).attempt, third.attempt)


class ReturnsTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = pretrained(bn_convnet(), *images(32))

    def forward(self, x):
        return self.body(x), x.mean()


class TupleModule(PlainModule):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0])[0], batch[1])


def test_a_classifier_that_returns_a_tuple_is_refused_with_what_to_do(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="net", **FAST)
    with pytest.raises(ValueError, match=r"the classifier \(module `net`\) returns a tuple; the pools need logits \(N, C\) "
                                         r"from it. Pass module= naming the submodule that returns logits"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(TupleModule(ReturnsTuple()), loader(*images(32)))


class CastsToFloat(PlainModule):
    """A half-precision dataset, cast to the network's precision inside training_step."""

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs.float()), labels)


@pytest.mark.parametrize("layers", [["input"], ["5"]], ids=["input", "hidden"])
def test_a_half_precision_batch_cast_in_training_step_is_attacked_in_the_model_s_precision(tmp_path, layers) -> None:
    inputs, labels = images(32)
    callback = LayerwiseAdversarialTraining(layers, module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback], max_steps=2).fit(CastsToFloat(pretrained(bn_convnet(), inputs, labels)),
                                                     loader(inputs.half(), labels))
    assert len(callback.pools[layers[0]]) > 0 and callback.pools[layers[0]].examples.dtype == torch.float32


class EmptyFirst(IterableDataset):
    def __iter__(self):
        inputs, labels = images(32)
        yield inputs[:0].clone(), labels[:0].clone()  # the stream's first batch is empty
        for start in range(0, 32, 8):
            yield inputs[start:start + 8].clone(), labels[start:start + 8].clone()


class SkipsEmpty(PlainModule):
    def training_step(self, batch, batch_idx):
        return None if len(batch[1]) == 0 else super().training_step(batch, batch_idx)


def test_an_empty_first_batch_is_passed_over(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="net", refresh_every=1, mix_fraction=0.25, **FAST)
    trainer_for(tmp_path, [callback], max_epochs=1).fit(SkipsEmpty(pretrained(bn_convnet(), *images(32))),
                                                      DataLoader(EmptyFirst(), batch_size=None))
    assert callback.steps_taken["input"] == 4 and len(callback.pools["input"]) > 0


class TrainingOnly(nn.Module):
    """Changes what reaches the layers above it in training only: ``crop`` drops the last column
    of the feature map, ``twice`` stacks the batch on itself (and ``Halves`` averages it back)."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change

    def forward(self, x):
        if not self.training:
            return x
        return x[..., :-1] if self.change == "crop" else torch.cat([x, x])


class Halves(nn.Module):
    def forward(self, x):
        return (x[: len(x) // 2] + x[len(x) // 2:]) / 2 if self.training else x


def _changing_net(change: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), TrainingOnly(change), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), Halves(), nn.Linear(4, 2))


@pytest.mark.parametrize(("change", "message"), [
    ("crop", r"^layer `2` returned rows of shape \(4, 32, 31\) in training, its pool holds \(4, 32, 32\): the inputs "
             r"changed shape on the way \(a crop\?\)$"),
    ("twice", r"^layer `2` returned \(32, 4, 32, 32\) in training, where the batch the callback mixed had 16 rows: "
              r"the batch changed on its way to the layer$"),
], ids=["crop", "twice"])
def test_a_network_that_changes_the_rows_below_a_hidden_layer_in_training_is_refused(tmp_path, change, message) -> None:
    callback = LayerwiseAdversarialTraining(["2"], module="net", mix_fraction=0.25, **FAST)
    with pytest.raises(ValueError, match=message):
        trainer_for(tmp_path, [callback], max_steps=2).fit(PlainModule(_changing_net(change)), loader(*images(32)))
