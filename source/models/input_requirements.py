"""What input each model accepts, so that a mismatch is refused before any training starts.

An input shape is ``(channels, height, width)`` for images and ``(features,)`` for vectors,
as the data sets report it (batch dimension excluded).
"""

import math
from dataclasses import dataclass

__all__ = ["ImageInput", "FlattenedInput"]


@dataclass(frozen=True)
class ImageInput:
    """Images whose height and width lie in ``[min_side, max_side]`` pixels.

    ``channels`` fixes the channel count (ImageNet models have a three-channel stem);
    ``None`` lets the model take any channel count.
    """

    min_side: int
    max_side: int
    channels: int | None = None

    def describe(self) -> str:
        """Name the accepted input in words, for error messages."""
        channel_words = "any number of channels" if self.channels is None else f"{self.channels} channels"
        return f"images of {self.min_side} to {self.max_side} pixels a side with {channel_words}"

    def problem_with(self, input_shape: tuple[int, ...]) -> str | None:
        """Return why ``input_shape`` does not fit, or ``None`` when it does."""
        if len(input_shape) != 3:
            return f"takes {self.describe()}, not input of shape {input_shape}"
        channels, height, width = input_shape
        if self.channels is not None and channels != self.channels:
            return f"takes images with {self.channels} channels, not {channels}"
        if not all(self.min_side <= side <= self.max_side for side in (height, width)):
            return f"takes images of {self.min_side} to {self.max_side} pixels a side, not {height}x{width}"
        return None


@dataclass(frozen=True)
class FlattenedInput:
    """Vectors of any length, or images flattened into vectors of at most ``max_image_values`` values.

    The limit keeps a fully connected first layer from growing huge by accident, e.g. on
    ImageNet-sized images.
    """

    max_image_values: int

    def describe(self) -> str:
        """Name the accepted input in words, for error messages."""
        return f"vectors, or images of at most {self.max_image_values} values (flattened)"

    def problem_with(self, input_shape: tuple[int, ...]) -> str | None:
        """Return why ``input_shape`` does not fit, or ``None`` when it does."""
        if len(input_shape) == 1:
            return None
        if len(input_shape) != 3:
            return f"takes {self.describe()}, not input of shape {input_shape}"
        values = math.prod(input_shape)
        if values > self.max_image_values:
            return f"takes images of at most {self.max_image_values} values (flattened), not {values}"
        return None

