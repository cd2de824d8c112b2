"""The weight initialisation shared by our own architectures."""

from torch import nn

__all__ = ["initialise_weights"]


def initialise_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place the way the original ResNet/DenseNet/MobileNet code does.

    Convolutions get He (Kaiming) normal weights scaled by fan-out, which keeps activation
    variance steady through ReLU stacks; normalisation layers start as the identity; linear
    layers keep PyTorch's default weights with zero bias.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
