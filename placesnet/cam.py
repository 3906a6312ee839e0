"""Where a model looks: Grad-CAM heatmaps of one class per image.

For a network that ends in global pooling and one linear layer (the ResNets) the class activation
map (Zhou et al., 2016) is the last conv map weighted by the class's fc weights. DeepCNN pools to a
grid and has two fc layers, so every model here uses the gradient form, Grad-CAM (Selvaraju et al.,
2017), which equals CAM up to scale where CAM applies: the class's logit is differentiated with
respect to the last conv stage's output, the gradients averaged over space give one weight per
channel, and the ReLU of the weighted sum of channels is the map. Computed by captum's LayerGradCam,
upsampled bilinearly to the image's size and scaled to [0, 1] per image. Ray-free; callers pass a
plain model (not DDP-wrapped).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn
from torchvision.models import VGG, AlexNet, DenseNet, ResNet

from placesnet.model import DeepCNN, InputStats


class Explanation(NamedTuple):
    """What :func:`explain` gives for N images of H x W pixels, on the model's device."""

    heatmaps: torch.Tensor  # (N, H, W) float32 in [0, 1]: 1 where the class's evidence peaks
    classes: torch.Tensor  # (N,) int64: the class each map explains
    probabilities: torch.Tensor  # (N,) float32: softmax probability of that class


def cam_layer(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM weighs: the last conv stage of ``model`` (or of the net
    inside :class:`~placesnet.model.InputStats`).

    ResNets (resnet18/50, wideresnet18): ``layer4``. DenseNet: ``features``, which ends in norm5
    (its forward applies the last ReLU). DeepCNN (and the workshop net), AlexNet, VGG: the last ReLU
    in ``features``, the last conv's activation before its max-pool, at twice the pooled map's
    resolution (the Grad-CAM paper's VGG layer). Any other network: its last child module holding
    an ``nn.Conv2d``. ValueError for a network without one."""
    net = model.net if isinstance(model, InputStats) else model
    if isinstance(net, ResNet):
        return net.layer4
    if isinstance(net, DenseNet):
        return net.features
    if isinstance(net, (DeepCNN, AlexNet, VGG)):
        return [m for m in net.features if isinstance(m, nn.ReLU)][-1]
    with_conv = [m for m in net.children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not with_conv:
        raise ValueError(f"{type(net).__name__} has no nn.Conv2d layer to take a class activation map of")
    return with_conv[-1]


def explain(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor | list[int] | None = None,
    layer: nn.Module | None = None,
) -> Explanation:
    """Grad-CAM heatmaps of ``images`` (N x 3 x H x W, already transformed as the model's input)
    for one class per image: ``classes`` (N class indices), or each image's top-1 class when None.

    ``layer`` defaults to :func:`cam_layer`. The model runs in eval mode on its own device, with
    gradients on even inside ``torch.no_grad`` or ``torch.inference_mode``; its modules' training
    modes and its parameters' ``requires_grad`` are as they were afterwards (both are changed
    while it runs: not for a model that another thread trains meanwhile), and no ``.grad`` is
    written. A map whose class has no positive evidence anywhere is all zeros (never NaN).
    ValueError for a number of classes other than N or a class index the model does not have.
    """
    layer = cam_layer(model) if layer is None else layer
    device = next(model.parameters()).device
    n = images.shape[0]
    if classes is not None and len(classes) != n:
        raise ValueError(f"explain needs one class per image: {n} images, {len(classes)} classes")
    seen: dict[str, torch.Tensor] = {}

    def class_logit(x: torch.Tensor) -> torch.Tensor:
        # One forward pass gives the logits, the top-1 class when none was asked for, and the
        # (N, 1) logit captum differentiates (so target=None: the class is chosen here).
        logits = model(x)
        if classes is None:
            chosen = logits.argmax(1)
        else:
            chosen = torch.as_tensor(classes, dtype=torch.long).to(device)
            if chosen.min() < 0 or chosen.max() >= logits.shape[1]:
                raise ValueError(f"classes must lie in 0..{logits.shape[1] - 1}, got {chosen.tolist()}")
        seen["logits"], seen["classes"] = logits.detach(), chosen
        return logits.gather(1, chosen[:, None])

    modules, params = list(model.modules()), list(model.parameters())
    modes, requires = [m.training for m in modules], [p.requires_grad for p in params]
    model.eval()
    try:
        # Frozen weights: the graph starts at the layer (captum makes its output require grad),
        # so the stages before it record nothing and no weight gradient is computed.
        for p in params:
            p.requires_grad_(False)
        # inference_mode(False): a caller's inference mode would otherwise record no graph; the
        # clone makes an inference tensor an ordinary one.
        with torch.inference_mode(False), torch.enable_grad():
            x = images.to(device).clone()
            size = tuple(x.shape[-2:])  # (H, W)
            cams = LayerGradCam(class_logit, layer).attribute(x, relu_attributions=True)  # (N, 1, h, w)
            cams = LayerAttribution.interpolate(cams.detach(), size, "bilinear")  # (N, 1, H, W)
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        for m, mode in zip(modules, modes):
            m.training = mode
    cams = cams[:, 0].float()
    peak = cams.amax(dim=(1, 2), keepdim=True)  # bilinear weights are convex: the map stays >= 0
    heatmaps = torch.where(peak > 0, cams / peak.clamp(min=torch.finfo(cams.dtype).tiny), 0.0)
    chosen = seen["classes"]
    probabilities = seen["logits"].float().softmax(1).gather(1, chosen[:, None])[:, 0]
    return Explanation(heatmaps, chosen, probabilities)
