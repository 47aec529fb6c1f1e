"""The callbacks on models we did not write: torchvision's resnet18, a transformer encoder, a
BatchNorm convnet, each inside a plain LightningModule that keeps the network in ``self.net``."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from advtrain.batch_statistics import SeparateBatchStatistics
from advtrain.callbacks import AdversarialEvaluation, LayerwiseAdversarialTraining, LipschitzMonitor
from tests.real_models import (DictItems, PlainModule, TransformerClassifier, bn_convnet, images, loader, pretrained,
                               resnet18, sequences)
from tests.wandb_records import history


def trained_bn_convnet() -> nn.Module:
    return pretrained(bn_convnet(), *images(64))


def trained_transformer() -> nn.Module:
    return pretrained(TransformerClassifier(), *sequences(64))


def trainer_for(tmp_path: Path, callbacks: list, logger=False, **settings) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **settings)


def offline_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return WandbLogger(project="advtrain-tests", save_dir=str(tmp_path), offline=True)


def finished_history(tmp_path: Path) -> dict[str, list]:
    import wandb

    wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    return history(run_file)


def test_resnet18_in_self_net_fills_every_pool_with_no_other_setting(tmp_path: Path, monkeypatch) -> None:
    callback = LayerwiseAdversarialTraining(layers=["input", "layer2", "layer3"], module="net")
    logger = offline_logger(tmp_path, monkeypatch)
    trainer = trainer_for(tmp_path, [callback], logger=logger, max_steps=6, log_every_n_steps=1)
    # trained a little first, as a user's model is: on random weights half the seeds left a pool empty
    # (tests/scripts/pool_fill_margin.py, benchmarks/results/pool_fill_margin/)
    net = pretrained(resnet18(), *images(96), steps=10)
    trainer.fit(PlainModule(net), loader(*images(96), shuffle=True))
    assert all(len(pool) > 0 for pool in callback.pools.values()), {k: len(p) for k, p in callback.pools.items()}
    series = finished_history(tmp_path)
    for layer in ("input", "layer2", "layer3"):
        assert series[f"adv/{layer}/pool_size"][-1] == len(callback.pools[layer])
        assert all(0.0 <= value <= 1.0 for value in series[f"adv/{layer}/generation_success"])
    assert callback.boxes["layer2"] == (0.0, float("inf"))  # a stage of blocks ending in ReLU


def test_transformer_encoder_layer_pool_fills(tmp_path: Path, monkeypatch) -> None:
    callback = LayerwiseAdversarialTraining(layers=["input", "encoder.layers.0"], module="net")
    logger = offline_logger(tmp_path, monkeypatch)
    trainer = trainer_for(tmp_path, [callback], logger=logger, max_steps=4, log_every_n_steps=1)
    trainer.fit(PlainModule(trained_transformer(), lr=0.02), loader(*sequences(64)))
    assert all(len(pool) > 0 for pool in callback.pools.values())
    assert callback.boxes["encoder.layers.0"] == (float("-inf"), float("inf"))  # ends in LayerNorm: no known range
    series = finished_history(tmp_path)
    assert series["adv/encoder.layers.0/pool_size"][-1] == len(callback.pools["encoder.layers.0"])


class PoolRowsLoss(PlainModule):
    """Trains on the pool rows alone (the batch's last ``rows``) and keeps the gradients."""

    def __init__(self, net: nn.Module, rows: int) -> None:
        super().__init__(net, lr=0.0)
        self.rows = rows

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs)[-self.rows:], labels[-self.rows:])

    def on_after_backward(self):
        self.grads = {name: None if p.grad is None else p.grad.detach().abs().sum() for name, p in self.net.named_parameters()}


def _pool_rows_gradients(tmp_path: Path, net: nn.Module, layer: str) -> dict[str, torch.Tensor | None]:
    module = PoolRowsLoss(net, rows=4)
    callback = LayerwiseAdversarialTraining([layer], module="net", mix_fraction=0.25, capacity=64)
    trainer_for(tmp_path, [callback], max_steps=1).fit(module, loader(*images(64)))
    assert len(callback.pools[layer]) > 0
    return module.grads


@pytest.mark.parametrize(("build", "layer", "below", "above"), [
    (resnet18, "layer2", ("conv1.", "bn1.", "layer1.", "layer2."), ("layer3.", "layer4.", "fc.")),
    (trained_bn_convnet, "5", ("0.", "1.", "3.", "4."), ("6.", "7.", "11.")),
], ids=["resnet18-layer2", "bn-convnet"])
def test_pool_rows_give_no_gradient_at_or_below_their_layer_with_batch_norm(tmp_path, monkeypatch, build, layer,
                                                                            below, above) -> None:
    grads = _pool_rows_gradients(tmp_path / "isolated", build(), layer)
    for name, grad in grads.items():
        if name.startswith(below):
            assert grad is None or grad == 0, f"{name} got gradient {grad} from the pool rows"
    assert any(grad is not None and grad > 0 for name, grad in grads.items() if name.startswith(above))
    # the same run with batch statistics shared between clean and pool rows leaks below the layer
    monkeypatch.setattr(SeparateBatchStatistics, "arm", lambda self, rows: None)
    leaky = _pool_rows_gradients(tmp_path / "shared", build(), layer)
    assert any(grad is not None and grad > 0 for name, grad in leaky.items() if name.startswith(below))


def test_separate_batch_statistics_normalise_pool_rows_like_the_clean_rows() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3, momentum=0.5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    reference = nn.BatchNorm2d(3, momentum=0.5)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(10, 3, 4, 4) * 3 + 1
    separate = SeparateBatchStatistics(norm)
    separate.arm(4)
    output = norm(x)
    separate.disarm()
    clean = reference(x[:6])
    torch.testing.assert_close(output[:6], clean)
    torch.testing.assert_close(norm.running_mean, reference.running_mean)  # updated by the clean rows only
    mean, var = x[:6].mean((0, 2, 3)), x[:6].var((0, 2, 3), unbiased=False)
    expected = (x[6:] - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + norm.eps).sqrt()
    torch.testing.assert_close(output[6:], expected * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))
    before = norm.running_var.clone()
    separate.arm(10)  # every row a pool row: running statistics, left as they were
    torch.testing.assert_close(norm(x), nn.functional.batch_norm(x, norm.running_mean, before, norm.weight, norm.bias, False))
    separate.disarm()
    assert torch.equal(norm.running_var, before)
    separate.remove()


def _views(x, y):
    return torch.cat([x, x.flip(3)]), torch.cat([y, y])


def _crop(x, y):
    return x[..., 2:-2, 2:-2], y


def _shuffle(x, y):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


@pytest.mark.parametrize(("augment", "message"), [
    (_views, r"the classifier got 32 rows, the batch the callback mixed pool rows into had 16"),
    (_crop, r"got inputs of shape \(3, 28, 28\), the batch had \(3, 32, 32\)"),
    (_shuffle, r"got its rows in another order \(training_step shuffled them\)"),
], ids=["concatenated-views", "crop", "shuffle"])
def test_a_batch_changed_in_training_step_is_refused_at_a_hidden_layer(tmp_path, augment, message) -> None:
    callback = LayerwiseAdversarialTraining(["5"], module="net", mix_fraction=0.25)
    with pytest.raises(ValueError, match=message + r".*augment or mix in the data pipeline"):
        trainer_for(tmp_path, [callback], max_steps=2).fit(PlainModule(trained_bn_convnet(), augment=augment), loader(*images(64)))


def test_input_pools_meet_augmentation_in_training_step_as_ordinary_rows(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="net", mix_fraction=0.25)
    trainer_for(tmp_path, [callback], max_steps=2).fit(PlainModule(trained_bn_convnet(), augment=_views), loader(*images(64)))
    assert len(callback.pools["input"]) > 0


def test_a_layer_bypassed_by_a_skip_connection_is_refused_with_the_layers_that_work(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["layer2.0.conv1"], module="net")
    with pytest.raises(ValueError, match=r"below layer `layer2.0.conv1` reach the logits around it .* used: layer2.0, layer2"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(PlainModule(resnet18()), loader(*images(32)))


def test_normalised_inputs_outside_the_input_box_are_refused_before_training(tmp_path) -> None:
    inputs, labels = images(32)
    callback = LayerwiseAdversarialTraining(["input"], module="net")
    with pytest.raises(ValueError, match=r"inputs span \[-2, 2\], outside the input box \(0, 1\); pass bounds=\{'input'"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(PlainModule(trained_bn_convnet()), loader((inputs - 0.5) * 4, labels))
    callback = LayerwiseAdversarialTraining(["input"], module="net", bounds={"input": (-2.0, 2.0)})
    trainer_for(tmp_path, [callback], max_steps=1).fit(PlainModule(trained_bn_convnet()), loader((inputs - 0.5) * 4, labels))
    assert len(callback.pools["input"]) > 0


def test_a_box_too_tight_for_the_activations_is_widened_with_a_warning(tmp_path) -> None:
    callback = LayerwiseAdversarialTraining(["layer2"], module="net", bounds={"layer2": (0.0, 0.01)}, mix_fraction=0.25)
    with pytest.warns(UserWarning, match=r"layer `layer2`: \d+ clean activations lie outside its box \(0, 0.01\)"):
        trainer_for(tmp_path, [callback], max_steps=2).fit(PlainModule(resnet18()), loader(*images(64)))
    assert len(callback.pools["layer2"]) > 0


def test_batch_keys_said_once_serve_every_callback(tmp_path: Path) -> None:
    inputs, labels = images(32)
    data = DataLoader(DictItems(inputs, labels, keys=("img", "cls")), batch_size=16)
    pools = LayerwiseAdversarialTraining(["input", "5"], module="net", batch_keys=("img", "cls"), mix_fraction=0.25)
    monitor = LipschitzMonitor(module="net")
    evaluation = AdversarialEvaluation(examples=8, module="net", figure_examples=0)
    module = PlainModule(trained_bn_convnet(), keys=("img", "cls"))
    trainer_for(tmp_path, [pools, monitor, evaluation], max_epochs=1, num_sanity_val_steps=0).fit(module, data, data)
    assert monitor.input_shape == (3, 32, 32) and len(monitor.history) == 1
    assert evaluation.reports["val"].attacked > 0
    assert len(pools.pools["5"]) > 0


def test_dict_batches_with_unknown_keys_get_a_clear_error_not_a_key_error(tmp_path: Path) -> None:
    inputs, labels = images(32)
    data = DataLoader(DictItems(inputs, labels, keys=("img", "cls")), batch_size=16)
    with pytest.raises(ValueError, match=r"cannot tell the inputs and labels of a dict batch with keys: img, cls; "
                                         r"name them once with batch_keys="):
        trainer_for(tmp_path, [LipschitzMonitor(module="net")], max_steps=1).fit(
            PlainModule(trained_bn_convnet(), keys=("img", "cls")), data)


def test_nothing_attacked_logs_no_success_rate(tmp_path: Path) -> None:
    class AlwaysWrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 2)

        def forward(self, x):
            logits = self.fc(x.flatten(1))
            return torch.stack([logits[:, 0] + 1e4, logits[:, 1]], 1)  # predicts class 0 whatever it sees

    inputs, _ = images(32)
    callback = LayerwiseAdversarialTraining(["input"], module="net")
    trainer = trainer_for(tmp_path, [callback], max_steps=1)
    trainer.fit(PlainModule(AlwaysWrong()), loader(inputs, torch.ones(32, dtype=torch.long)))
    assert callback.stats["input"]["generation_attacked"] == 0.0
    assert "adv/input/generation_success" not in trainer.logged_metrics
    assert trainer.logged_metrics["adv/input/generation_attacked"] == 0.0
