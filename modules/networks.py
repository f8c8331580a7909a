"""Backbones used by litplug's modules and configs.

Every network takes its input shape as an argument and is built from plain ``nn.Sequential``
blocks, so it traces with ``torch.fx`` (needed by the interval bound engine) and shards with
``fully_shard`` block by block.

Example:
    >>> import torch
    >>> net = ConvNet(input_shape=[1, 8, 8], num_outputs=10)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import nn

from ..validation import check_bool, check_choice, check_fraction, check_list, check_positive_int

Activation = Literal["relu", "tanh", "sigmoid", "leaky_relu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(check_list(name, shape, check_positive_int, nonempty=True))


def _activation(name: str) -> nn.Module:
    return _ACTIVATIONS[check_choice("activation", name, sorted(_ACTIVATIONS))]()


class MLP(nn.Sequential):
    """Fully connected network: flatten, then ``Linear -> [BatchNorm] -> act -> [Dropout]`` blocks.

    Args:
        input_shape: shape of one input without the batch dimension, e.g. ``[1, 8, 8]`` or ``[16]``.
        num_outputs: size of the last layer (number of classes, or 1 for a regressor).
        hidden: widths of the hidden layers.
        activation: non-linearity between layers.
        batch_norm: add ``BatchNorm1d`` after every hidden ``Linear``.
        dropout: dropout probability after every hidden block (0 disables it).

    Example:
        >>> import torch
        >>> MLP(input_shape=[16], num_outputs=1, hidden=[32])(torch.zeros(4, 16)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_outputs: int = 10,
        hidden: Sequence[int] = (256, 256),
        activation: Activation = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        shape = _check_shape("input_shape", input_shape)
        check_positive_int("num_outputs", num_outputs)
        check_list("hidden", hidden, check_positive_int)
        _activation(activation)
        check_bool("batch_norm", batch_norm)
        check_fraction("dropout", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = math.prod(shape)
        for width in hidden:
            block: list[nn.Module] = [nn.Linear(width_in, width)]
            if batch_norm:
                block.append(nn.BatchNorm1d(width))
            block.append(_activation(activation))
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            width_in = width
        layers.append(nn.Linear(width_in, num_outputs))
        super().__init__(*layers)
        self.input_shape = shape
        self.num_outputs = num_outputs


class ConvNet(nn.Sequential):
    """A small CNN of 3x3 convolution blocks and a hidden linear layer.

    Small CNN: ``Conv3x3 -> [BatchNorm] -> act`` blocks (stride 2 after the first), then a
    hidden ``Linear`` and the output layer.

    Args:
        input_shape: ``[channels, height, width]`` of one input.
        num_outputs: number of classes.
        channels: output channels of each convolution block.
        hidden: width of the fully connected layer before the output.
        activation: non-linearity.
        batch_norm: add ``BatchNorm2d``/``BatchNorm1d`` after each convolution / hidden linear.

    Example:
        >>> import torch
        >>> ConvNet(input_shape=[3, 32, 32], num_outputs=10)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_outputs: int = 10,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        activation: Activation = "relu",
        batch_norm: bool = True,
    ) -> None:
        shape = _check_shape("input_shape", input_shape)
        if len(shape) != 3:
            raise ValueError(f"`input_shape` must be [channels, height, width], got {list(shape)}")
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("hidden", hidden)
        check_list("channels", channels, check_positive_int, nonempty=True)
        _activation(activation)
        check_bool("batch_norm", batch_norm)
        layers: list[nn.Module] = []
        c_in, h, w = shape
        for i, c_out in enumerate(channels):
            stride = 1 if i == 0 else 2
            block: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)]
            if batch_norm:
                block.append(nn.BatchNorm2d(c_out))
            block.append(_activation(activation))
            layers.append(nn.Sequential(*block))
            c_in, h, w = c_out, (h - 1) // stride + 1, (w - 1) // stride + 1
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c_in * h * w, hidden)]
        if batch_norm:
            head.append(nn.BatchNorm1d(hidden))
        head.append(_activation(activation))
        layers.append(nn.Sequential(*head))
        layers.append(nn.Linear(hidden, num_outputs))
        super().__init__(*layers)
        self.input_shape = shape
        self.num_outputs = num_outputs


class CNN7(nn.Sequential):
    """The 7-layer CNN of certified training (Shi et al. 2021).

    ``cnn_7layer_bn2`` of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup"):
    five ``Conv3x3 -> BatchNorm2d -> ReLU`` blocks with ``width, width, 2w (stride 2), 2w, 2w``
    channels, then ``Linear(linear_size) -> BatchNorm1d -> ReLU`` and the output layer.

    Args:
        input_shape: ``[channels, height, width]`` (``[1, 28, 28]`` MNIST, ``[3, 32, 32]`` CIFAR-10).
        num_outputs: number of classes.
        width: channels of the first convolutions (the paper: 64).
        linear_size: width of the hidden linear layer (the paper: 512).

    Example:
        >>> import torch
        >>> CNN7(input_shape=[1, 8, 8], num_outputs=10, width=4, linear_size=16)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_outputs: int = 10,
        width: int = 64,
        linear_size: int = 512,
    ) -> None:
        shape = _check_shape("input_shape", input_shape)
        if len(shape) != 3:
            raise ValueError(f"`input_shape` must be [channels, height, width], got {list(shape)}")
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("width", width)
        check_positive_int("linear_size", linear_size)
        c_in, h, w = shape
        layers: list[nn.Module] = []
        for c_out, stride in [(width, 1), (width, 1), (2 * width, 2), (2 * width, 1), (2 * width, 1)]:
            layers.append(
                nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
            )
            c_in, h, w = c_out, (h - 1) // stride + 1, (w - 1) // stride + 1
        layers.append(
            nn.Sequential(nn.Flatten(), nn.Linear(c_in * h * w, linear_size), nn.BatchNorm1d(linear_size), nn.ReLU())
        )
        layers.append(nn.Linear(linear_size, num_outputs))
        super().__init__(*layers)
        self.input_shape = shape
        self.num_outputs = num_outputs
