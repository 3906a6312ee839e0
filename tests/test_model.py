"""DeepCNN is correct for any input size and batch size 1 (the workshop's model was not)."""

import pytest
import torch

from placesnet.config import TrainConfig
from placesnet.model import DeepCNN, build_model, count_parameters


@pytest.mark.parametrize("size", [32, 64, 100, 256])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model", ["deepcnn", "workshop"])
def test_output_shape_any_size(model, size, batch):
    net = build_model(TrainConfig(model=model), num_classes=7).eval()
    with torch.no_grad():
        out = net(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 7)  # the workshop's view(-1, ...) merged samples here


def test_resnet18_baseline():
    net = build_model(TrainConfig(model="resnet18"), num_classes=365).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 365)


def test_samples_do_not_mix():
    """Each output row depends only on its own image (in eval mode)."""
    net = DeepCNN(5, widths=(8, 16)).eval()
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        together = net(x)
        alone = torch.cat([net(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_config_shapes_the_model():
    net = build_model(TrainConfig(widths=(4, 8, 16)), num_classes=3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net.fc1.out_features == 1024 and net.fc2.out_features == 3


def test_workshop_model_is_the_workshops_two_layers():
    net = build_model(TrainConfig(model="workshop"), num_classes=365)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net.fc1.out_features == 1024
    assert count_parameters(net) < 20_000_000  # not the 537M-weight fc1 of flattening 128x64x64
