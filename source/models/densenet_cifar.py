"""DenseNets for CIFAR-sized images (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

Three dense blocks joined by transitions (BN-ReLU-1x1 conv-2x2 average pool); every layer
sees the concatenation of all earlier feature maps in its block and adds ``growth_rate``
new ones. DenseNet-40 uses plain BN-ReLU-3x3 layers and keeps all channels at transitions;
DenseNet-BC adds a 1x1 bottleneck (4 x growth_rate channels) to each layer and halves the
channels at each transition. No dropout: the paper uses it only without data augmentation.
"""

import torch
from torch import nn

from source.models.initialisation import initialise_weights

__all__ = ["DenseNetCifar"]

NUMBER_OF_DENSE_BLOCKS = 3
BOTTLENECK_WIDTH_FACTOR = 4


class DenseLayer(nn.Module):
    """BN-ReLU-3x3 conv (optionally after a BN-ReLU-1x1 bottleneck); output concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool) -> None:
        super().__init__()
        parts: list[nn.Module] = []
        channels = in_channels
        if bottleneck:
            bottleneck_channels = BOTTLENECK_WIDTH_FACTOR * growth_rate
            parts += [
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, bottleneck_channels, 1, bias=False),
            ]
            channels = bottleneck_channels
        parts += [
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, growth_rate, 3, padding=1, bias=False),
        ]
        self.new_features = nn.Sequential(*parts)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return the inputs with ``growth_rate`` new channels appended."""
        return torch.cat([inputs, self.new_features(inputs)], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNetCifar(nn.Module):
    """DenseNet of total ``depth`` for small images.

    Without bottleneck each block has (depth - 4) / 3 layers and the stem has 16 channels;
    with bottleneck (DenseNet-BC) each block has (depth - 4) / 6 layers (two convolutions
    each) and the stem has 2 x growth_rate channels. ``compression`` is the fraction of
    channels a transition keeps (1.0 keeps all).

    Example:
        >>> model = DenseNetCifar(depth=100, growth_rate=12, bottleneck=True, compression=0.5, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int,
        growth_rate: int,
        bottleneck: bool,
        compression: float,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        convolutions_per_layer = 2 if bottleneck else 1
        # Depth counts the stem, the two transition convolutions and the classifier besides the layers.
        layer_depth = depth - 4
        if layer_depth <= 0 or layer_depth % (NUMBER_OF_DENSE_BLOCKS * convolutions_per_layer) != 0:
            raise ValueError(f"Invalid DenseNet depth: {depth} (must be 3 * {convolutions_per_layer} * n + 4)")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"Invalid DenseNet compression: {compression} (must be in (0, 1])")
        layers_per_block = layer_depth // (NUMBER_OF_DENSE_BLOCKS * convolutions_per_layer)

        channels = 2 * growth_rate if bottleneck else 16
        features: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block_index in range(NUMBER_OF_DENSE_BLOCKS):
            for _ in range(layers_per_block):
                features.append(DenseLayer(channels, growth_rate, bottleneck))
                channels += growth_rate
            if block_index < NUMBER_OF_DENSE_BLOCKS - 1:
                kept_channels = int(channels * compression)
                features.append(Transition(channels, kept_channels))
                channels = kept_channels
        features += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(channels, num_classes)
        initialise_weights(self)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return class scores of shape (batch, num_classes)."""
        return self.classifier(torch.flatten(self.features(inputs), 1))
