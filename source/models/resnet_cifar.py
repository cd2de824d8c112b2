"""ResNets for CIFAR-sized images (He et al., "Deep Residual Learning", CVPR 2016, section 4.2).

A 3x3 stem with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64
channels, where depth = 6n + 2; stages two and three halve the resolution. Shortcuts that
change shape use the paper's option A (subsample, then pad with zero channels), which has
no parameters, so the counts match the published ones (ResNet-20: 0.27 M).
"""

import torch
import torch.nn.functional as F
from torch import nn

from source.models.initialisation import initialise_weights

__all__ = ["ResNetCifar", "STAGE_WIDTHS"]

STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and append zero channels."""

    def __init__(self, added_channels: int, stride: int) -> None:
        super().__init__()
        self.added_channels = added_channels
        self.stride = stride

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return ``inputs`` subsampled and padded to the block's output channels."""
        subsampled = inputs[:, :, :: self.stride, :: self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, 0, self.added_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ZeroPadShortcut(out_channels - in_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply the residual branch and add the shortcut."""
        branch = F.relu(self.bn1(self.conv1(inputs)))
        branch = self.bn2(self.conv2(branch))
        return F.relu(branch + self.shortcut(inputs))


class ResNetCifar(nn.Module):
    """ResNet-``depth`` for small images; ``depth`` must be 6n + 2 (20, 32, 44, 56, 110, ...).

    Example:
        >>> model = ResNetCifar(depth=20, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Invalid CIFAR ResNet depth: {depth} (must be 6n + 2 with n >= 1)")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(STAGE_WIDTHS[0]),
            nn.ReLU(inplace=True),
        )
        blocks = []
        channels = STAGE_WIDTHS[0]
        for stage_index, width in enumerate(STAGE_WIDTHS):
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        initialise_weights(self)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return class scores of shape (batch, num_classes)."""
        features = self.pool(self.blocks(self.stem(inputs)))
        return self.classifier(torch.flatten(features, 1))
