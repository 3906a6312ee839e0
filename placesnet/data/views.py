"""How a checkpoint's model sees an image: the eval transform its config records, as one view or
as the official ten crops, and a line that says which.

A checkpoint of this project records none (``config.preprocess`` is None): the shorter side is
resized to ``image_size`` and centre-cropped (:func:`transforms.eval_transform`), then normalised
with 0.5 (:func:`transforms.normalize`). An imported published model records its own
(:class:`placesnet.config.Preprocess`): resized to 256x256, centre crop 224, ImageNet mean and
std, which :class:`placesnet.model.InputStats` applies inside the model. Every transform here maps
a PIL image or a uint8 (3, H, W) tensor (a dataset file, an nvJPEG decode on the GPU) to uint8:
(3, S, S) for one view, (10, 3, S, S) for ten crops, S = ``config.image_size``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms.v2 import functional as TF

from placesnet.config import TrainConfig, UserError
from placesnet.data.transforms import MEAN, STD, eval_transform

TEN_CROPS = 10  # the 4 corners and the centre, and each mirrored


class ResizeCrop:
    """Resize to ``resize`` = (height, width), then the centre ``crop`` (or ``ten`` crops).

    A PIL image is resized by PIL, as torchvision's ``Resize`` does in the official pipeline, so
    predict and the CPU serve path see the official pixels; a tensor by torchvision's antialiased
    bilinear resize (a 256x256 Places365 file is not resized at all)."""

    def __init__(self, resize: tuple[int, int], crop: int, ten: bool = False) -> None:
        self.resize, self.crop, self.ten = list(resize), crop, ten

    def __call__(self, image) -> torch.Tensor:
        image = TF.resize(image, self.resize, antialias=True)
        if self.ten:
            return torch.stack([_uint8(view) for view in TF.ten_crop(image, [self.crop])])
        return _uint8(TF.center_crop(image, [self.crop]))

    def __repr__(self) -> str:
        return f"ResizeCrop({self.resize}, {self.crop}{', ten crops' if self.ten else ''})"


def _uint8(image) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image)


def single_view(config: TrainConfig) -> Callable:
    """The checkpoint's eval transform: uint8 (3, S, S) per image."""
    if config.preprocess is None:
        return eval_transform(config.image_size)
    return ResizeCrop(config.preprocess.resize, config.image_size)


def ten_crops(config: TrainConfig) -> ResizeCrop:
    """The official ten-crop views of the checkpoint's eval transform: uint8 (10, 3, S, S) per
    image. UserError for a checkpoint whose transform does not crop (the project's own: its
    images are resized to the model's input size, so its ten crops would be one and its mirror)."""
    if config.preprocess is None:
        raise UserError(
            f"--ten-crop: this checkpoint's images are resized to its input size "
            f"({config.image_size} px), so there is nothing to crop: ten crops need a model whose "
            "transform crops, as an imported published model's (rayjobs/import_weights.py)"
        )
    return ResizeCrop(config.preprocess.resize, config.image_size, ten=True)


def describe(config: TrainConfig, ten: bool = False) -> str:
    """The transform in words, e.g. 'resize to 256x256, centre crop 224, mean (...), std (...)'."""
    size, p = config.image_size, config.preprocess
    resize = f"resize the shorter side to {size}" if p is None else f"resize to {p.resize[0]}x{p.resize[1]}"
    crop = f"centre crop {size}" if not ten else f"ten {size} px crops (4 corners + centre, and mirrored)"
    mean, std = (MEAN, STD) if p is None else (p.mean, p.std)
    return f"{resize}, {crop}, mean {_numbers(mean)}, std {_numbers(std)}"


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
