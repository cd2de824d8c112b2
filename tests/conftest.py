"""Problems and models that several optimizer tests share.

Test modules import the helpers by name (``from tests.conftest import quadratic_problem``).
"""

import torch
from torch import nn

from source.optimizer.lab_pal import make_batch_closure


def quadratic_problem(dimension=6, seed=0):
    """f(θ) = ½ θᵀAθ − bᵀθ with A positive definite, in float64: (θ, A, b, closure)."""
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(dimension, dimension, generator=generator, dtype=torch.float64)
    a = m @ m.T / dimension + 0.5 * torch.eye(dimension, dtype=torch.float64)
    b = torch.randn(dimension, generator=generator, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(dimension, generator=generator, dtype=torch.float64))

    def loss():
        return 0.5 * theta @ a @ theta - b @ theta

    return theta, a, b, loss


class SmallBatchNormNet(nn.Module):
    """A convolution with BatchNorm and dropout over 1×6×6 images, three classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(16, 3)

    def forward(self, inputs):
        return self.head(self.features(inputs).flatten(1))


def image_batches(count, size=8, seed=0):
    """``count`` batches of random 1×6×6 images with labels in 0..2."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 6, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
        for _ in range(count)
    ]


def train_steps(model, optimizer, batches):
    """One line-search step per batch, through closures of the mean cross-entropy."""
    loss_function = nn.CrossEntropyLoss()
    for inputs, targets in batches:
        optimizer.step(make_batch_closure(model, loss_function, inputs, targets))
