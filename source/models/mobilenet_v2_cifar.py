"""MobileNet-V2 for CIFAR-sized images (Sandler et al., "MobileNetV2", CVPR 2018).

The ImageNet architecture with width multiplier 1.0, changed only where 32-pixel images
need it: the stem and the second stage (24 channels) use stride 1 instead of 2, so the
network downsamples by 8 instead of 32 and ends on 4x4 feature maps for CIFAR. Parameter
count is that of the ImageNet model with the same number of classes (2.24 M for 10).
No dropout before the classifier, as in the common CIFAR adaptations.
"""

import torch
from torch import nn

from source.models.initialisation import initialise_weights

__all__ = ["MobileNetV2Cifar", "INVERTED_RESIDUAL_STAGES"]

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (expansion factor t, output channels c, blocks n, stride s of the first block), as in the
# paper's Table 2 except the second row's stride (2 on ImageNet).
INVERTED_RESIDUAL_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def convolution_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Return conv (no bias) -> BatchNorm -> ReLU6 with 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expansion
        parts: list[nn.Module] = []
        if expansion != 1:
            parts.append(convolution_bn_relu6(in_channels, hidden_channels, 1))
        parts += [
            convolution_bn_relu6(hidden_channels, hidden_channels, 3, stride, groups=hidden_channels),
            # The projection stays linear: a ReLU here would destroy information in the narrow layer.
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.branch = nn.Sequential(*parts)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply the block, adding the input when shapes match."""
        outputs = self.branch(inputs)
        return inputs + outputs if self.has_residual else outputs


class MobileNetV2Cifar(nn.Module):
    """MobileNet-V2 (width 1.0) with a stride-1 stem and second stage, for small images.

    Example:
        >>> model = MobileNetV2Cifar(num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [convolution_bn_relu6(in_channels, STEM_CHANNELS, 3)]
        channels = STEM_CHANNELS
        for expansion, out_channels, blocks, first_stride in INVERTED_RESIDUAL_STAGES:
            for block_index in range(blocks):
                stride = first_stride if block_index == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        layers += [convolution_bn_relu6(channels, HEAD_CHANNELS, 1), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        initialise_weights(self)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return class scores of shape (batch, num_classes)."""
        return self.classifier(torch.flatten(self.features(inputs), 1))
