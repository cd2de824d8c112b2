"""Small fast models for quick runs on CPU: a CNN for tiny images and an MLP for feature vectors."""

import math

import torch
from torch import nn

from source.models.initialisation import initialise_weights

__all__ = ["SmallCnn", "Mlp"]


class SmallCnn(nn.Module):
    """Two 3x3 conv-BN-ReLU layers (32 and 64 channels) with a 2x2 max pool between, then a linear head.

    The last feature map is average-pooled to 2x2 rather than 1x1, so the head still sees
    coarse layout (where strokes are in an 8x8 digit); any input of at least 4x4 pixels works.

    Example:
        >>> model = SmallCnn(num_classes=10, in_channels=1)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    POOLED_SIDE = 2

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(self.POOLED_SIDE),
        )
        self.classifier = nn.Linear(64 * self.POOLED_SIDE**2, num_classes)
        initialise_weights(self)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return class scores of shape (batch, num_classes)."""
        return self.classifier(torch.flatten(self.features(inputs), 1))


class Mlp(nn.Module):
    """Two hidden ReLU layers of ``hidden_width`` units; inputs of any shape are flattened first.

    Example:
        >>> model = Mlp(num_outputs=1, input_shape=(10,))
        >>> model(torch.zeros(2, 10)).shape
        torch.Size([2, 1])
    """

    def __init__(self, num_outputs: int, input_shape: tuple[int, ...], hidden_width: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden_width),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_width, hidden_width),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_width, num_outputs),
        )
        initialise_weights(self)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return outputs of shape (batch, num_outputs)."""
        return self.layers(inputs)
