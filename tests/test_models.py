"""The paper's models: shapes, layer names, penalties, the autoencoder's pretraining."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.models import (
    MODEL_BUILDERS,
    ae400_10,
    build_model,
    fc100_100_10,
    pretrain_sparse_autoencoder,
    sigmoid_mlp,
)


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_every_model_maps_images_to_ten_logits(name: str) -> None:
    paper_model = build_model(name)
    logits = paper_model.module(torch.rand(3, *paper_model.input_shape))
    assert logits.shape == (3, 10)
    modules = dict(paper_model.module.named_modules())
    assert all(layer in modules for layer in [*paper_model.penalties, *paper_model.frozen])


def test_fc100_layers_and_penalties_follow_the_paper() -> None:
    paper_model = fc100_100_10()
    names = [name for name, _ in paper_model.module.named_children()]
    assert names == ["flatten", "fc1", "sigmoid1", "fc2", "sigmoid2", "logits"]
    assert paper_model.penalties == {"fc1": 1e-5, "fc2": 1e-5, "logits": 1e-6}
    assert [paper_model.module.fc1.out_features, paper_model.module.fc2.out_features] == [100, 100]


def test_dropout_variant_inserts_dropout_after_each_hidden_layer() -> None:
    names = [name for name, _ in fc100_100_10(dropout=0.5).module.named_children()]
    assert names == ["flatten", "fc1", "sigmoid1", "dropout1", "fc2", "sigmoid2", "dropout2", "logits"]
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fc100_100_10(dropout=1.0)


def test_sigmoid_mlp_takes_any_widths_with_the_paper_penalties() -> None:
    paper_model = sigmoid_mlp([400, 30, 7])
    assert paper_model.name == "FC400-30-7-10"
    assert paper_model.penalties == {"fc1": 1e-5, "fc2": 1e-5, "fc3": 1e-5, "logits": 1e-6}
    widths = [m.out_features for m in paper_model.module if isinstance(m, nn.Linear)]
    assert widths == [400, 30, 7, 10]
    assert paper_model.module(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("hidden", [[], [100, 0], [100, -5], [2.5], [True]])
def test_sigmoid_mlp_rejects_widths_that_are_not_positive_integers(hidden: list) -> None:
    with pytest.raises(ValueError, match="hidden must be one or more positive integer widths"):
        sigmoid_mlp(hidden)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'fc9'; models are: fc10-1e-4"):
        build_model("fc9")


def test_sparse_autoencoder_learns_then_freezes() -> None:
    generator = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(4, 1, 28, 28, generator=generator) > 0.5).float()
    images = prototypes.repeat(16, 1, 1, 1)  # structure an autoencoder can learn
    encoder = ae400_10().module.encoder
    history = pretrain_sparse_autoencoder(encoder, images, epochs=5, batch_size=16, lr=3e-3)
    assert history[-1] < history[0]
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    with pytest.raises(ValueError, match="images must have 784 values each"):
        pretrain_sparse_autoencoder(nn.Linear(784, 4), torch.rand(5, 10))


def test_the_anchor_convnets_have_their_papers_shapes() -> None:
    from advtrain.models import madry_convnet, wong_convnet

    madry, wong = madry_convnet(), wong_convnet()
    assert (madry.module.fc.in_features, madry.module.fc.out_features) == (64 * 7 * 7, 1024)  # 'same' padding
    assert [madry.module.conv1.out_channels, madry.module.conv2.out_channels] == [32, 64]
    assert (wong.module.fc.in_features, wong.module.fc.out_features) == (32 * 7 * 7, 100)
    parameters = lambda model: sum(p.numel() for p in model.module.parameters())  # noqa: E731
    assert parameters(madry) == 3_274_634 and parameters(wong) == 166_406
    assert madry.penalties == {} and wong.penalties == {}
