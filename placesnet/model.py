"""DeepCNN: the workshop's scene classifier, made correct for any input size.

The workshop stacked conv3x3 -> ReLU -> max-pool twice (64, 128 channels) and flattened straight
into fc1, sized for 128*128*128 inputs while a 256x256 image leaves 128*64*64: ``view(-1, ...)``
then merged samples and a single image crashed. Here every stage may add BatchNorm, and an
adaptive average pool to a fixed grid sits before fc1, so fc1's size no longer depends on the
image size. This file knows nothing of Ray, devices or DDP.

The torchvision architectures (config.TORCHVISION_MODELS) are those of the published Places365
models too: a config that records how such a model takes its images (``config.preprocess``, an
imported model) gets it wrapped in :class:`InputStats`, which turns the project's normalised input
into the mean and std it was trained with.
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


class InputStats(nn.Module):
    """``net`` fed the input it was trained on. Every loader, predict and serve path gives a model
    the workshop's normalised images, (pixels / 255 - 0.5) / 0.5 (data.transforms.normalize); a
    model trained elsewhere expects its own per-channel ``mean`` and ``std`` (of pixels / 255).
    No weights of its own: its state_dict is ``net``'s, under ``net.``."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from placesnet.data.transforms import MEAN, STD

        super().__init__()
        self.net = net
        for name, values in (("mean", mean), ("std", std), ("workshop_mean", MEAN), ("workshop_std", STD)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.workshop_std + self.workshop_mean  # back to pixels / 255, in [0, 1]
        return self.net((x - self.mean) / self.std)  # as torchvision's Normalize(mean, std)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The network named by ``config.model`` with ``num_classes`` outputs, randomly initialised;
    in :class:`InputStats` when the config records a ``preprocess`` (a model trained elsewhere)."""
    net = _network(config, num_classes)
    if config.preprocess is None:
        return net
    return InputStats(net, config.preprocess.mean, config.preprocess.std)


def _network(config: TrainConfig, num_classes: int) -> nn.Module:
    if config.model == "deepcnn":
        return DeepCNN(num_classes, config.widths, config.fc_hidden, dropout=config.dropout)
    if config.model == "workshop":
        # The workshop's two stages, no BatchNorm. Its fc1 would need 128*64*64*1024 = 537M weights
        # at 256 px; pooling to 8x8 first keeps fc1 at 8.4M and works for any size.
        return DeepCNN(num_classes, (64, 128), fc_hidden=1024, grid=8, batchnorm=False, dropout=0.0)
    if config.model == "wideresnet18":
        from torchvision.models import resnet18

        # Places365's wideresnet18 (CSAILVision/places365, wideresnet.py): ResNet-18 without the
        # max-pool after conv1, so every stage is twice as wide and high (layer4: 14x14 at 224 px);
        # its AvgPool2d(14) is the adaptive pool at 224 px. Same weights and names as resnet18.
        net = resnet18(weights=None, num_classes=num_classes)
        net.maxpool = nn.Identity()
        return net
    if config.model in ("resnet18", "resnet50", "alexnet", "densenet161"):
        import torchvision.models

        return getattr(torchvision.models, config.model)(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {config.model!r}")


def head_names(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s classifier head: its fully connected layers, every
    ``nn.Linear``, which in each of config.MODELS sit on top of the convolutions (DeepCNN's and
    the workshop net's ``fc1`` and ``fc2``, ResNet's ``fc``, AlexNet's ``classifier.1``, ``.4``
    and ``.6``, DenseNet's ``classifier``; under InputStats ``net.`` before each, under DDP
    ``module.``), the last of them the layer that outputs the classes. A run started from
    another checkpoint (placesnet/finetune.py) gets a new head when its classes differ: a trained
    head's hidden layers have learnt to ignore what tells apart classes it was not trained on
    (docs/recipe.md). Every other parameter is the backbone's."""
    head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not head:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: no classifier head")
    return head  # in the order named_modules() gives: the order the layers are built in


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(head, backbone)``: the parameters of ``model``'s classifier head (:func:`head_names`),
    and all the others, each in the model's order."""
    head = {id(p) for name in head_names(model) for p in model.get_submodule(name).parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) in head], [p for p in params if id(p) not in head]


def freeze_backbone(model: nn.Module) -> None:
    """Stop the backbone's parameters (all but the head's) from requiring gradients, so only the
    head trains. Before DDP wraps the model: DDP syncs the parameters that require gradients."""
    for p in split_parameters(model)[1]:
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
