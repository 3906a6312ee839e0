"""Image transforms: uint8 resize/crop on the loader side, :func:`normalize` on the device."""

from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the workshop's Normalize((0.5,), (0.5,))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]: ToTensor's /255 then Normalize(0.5, 0.5).

    The same operations in the same order as torchvision's, so values are bit-identical; run it on
    the training device, after the (4x smaller) uint8 batch has been copied there. Keeps the
    memory format (channels_last stays channels_last).
    """
    return images.float().div_(255).sub_(MEAN[0]).div_(STD[0])


class ResizeCenterCrop:
    """Resize (shorter side) + center crop to ``size``, as a uint8 (3, S, S) tensor.

    Takes a uint8 tensor (training data) or a PIL image (predict, serve), so every path sees the
    same pixels. An image that already is S x S (every Places365 image at 256) passes untouched.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            image = TF.pil_to_tensor(image)
        if image.shape[-2:] != (self.size, self.size):
            image = TF.center_crop(TF.resize(image, self.size, antialias=True), self.size)
        return image

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.size})"


def eval_transform(image_size: int) -> ResizeCenterCrop:
    """The eval (and default training) transform. With :func:`normalize` it is the workshop's
    Resize, ToTensor, Normalize(0.5): on square Places365 images the crop changes nothing; it makes
    any other image (predict, serve) ``image_size`` x ``image_size``."""
    return ResizeCenterCrop(image_size)


def train_transform(image_size: int, augment: bool) -> v2.Compose:
    if not augment:
        return eval_transform(image_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToPureTensor(),
        ]
    )


def workshop_transform(image_size: int = 256) -> T.Compose:
    """The workshop's float32 pipeline on PIL images: the reference for tests and benchmarks."""
    return T.Compose([T.Resize(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])
