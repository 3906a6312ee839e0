"""DeepCNN: the workshop's scene classifier, made correct for any input size.

The workshop stacked conv3x3 -> ReLU -> max-pool twice (64, 128 channels) and flattened straight
into fc1, sized for 128*128*128 inputs while a 256x256 image leaves 128*64*64: ``view(-1, ...)``
then merged samples and a single image crashed. Here every stage may add BatchNorm, and an
adaptive average pool to a fixed grid sits before fc1, so fc1's size no longer depends on the
image size. This file knows nothing of Ray, devices or DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from placesnet.config import TrainConfig


class DeepCNN(nn.Module):
    """conv3x3 [-> BatchNorm] -> ReLU -> max-pool stages, then fc1 -> ReLU -> dropout -> fc2.

    Args:
        num_classes: outputs of fc2, one per scene class.
        widths: output channels of each conv stage; each stage halves H and W.
        fc_hidden: units of fc1 (1024 in the workshop).
        grid: side of the fixed grid pooled to before fc1, so fc1 sees widths[-1] * grid**2.
        batchnorm: add BatchNorm after each conv (the workshop had none).
        dropout: dropout before fc2.
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        fc_hidden: int = 1024,
        grid: int = 4,
        batchnorm: bool = True,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        stages, in_ch = [], 3
        for width in widths:
            stages += [nn.Conv2d(in_ch, width, 3, padding=1, bias=not batchnorm)]
            stages += [nn.BatchNorm2d(width)] if batchnorm else []
            stages += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_ch = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc1 = nn.Linear(in_ch * grid * grid, fc_hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(fc_hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, widths[-1], H / 2**len(widths), W / 2**len(widths))
        x = self.pool(x)  # (B, widths[-1], grid, grid) whatever the input size
        x = torch.flatten(x, 1)  # keeps the batch dimension, unlike the workshop's view(-1, ...)
        x = self.dropout(torch.relu(self.fc1(x)))  # (B, fc_hidden)
        return self.fc2(x)  # (B, num_classes) logits


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The network named by ``config.model`` with ``num_classes`` outputs, randomly initialised."""
    if config.model == "deepcnn":
        return DeepCNN(num_classes, config.widths, config.fc_hidden, dropout=config.dropout)
    if config.model == "workshop":
        # The workshop's two stages, no BatchNorm. Its fc1 would need 128*64*64*1024 = 537M weights
        # at 256 px; pooling to 8x8 first keeps fc1 at 8.4M and works for any size.
        return DeepCNN(num_classes, (64, 128), fc_hidden=1024, grid=8, batchnorm=False, dropout=0.0)
    if config.model == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {config.model!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
