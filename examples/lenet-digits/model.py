"""A LeNet-style CNN: fedsim calls `lenet(input_shape, num_classes, model_section)`; the extra key
`model.channels` is this model's own."""

from torch import nn


def lenet(input_shape, num_classes, spec):
    """Two 3x3 convolutions with max-pooling, then two dense layers."""
    channels, height, width = input_shape
    first, second = getattr(spec, "channels", [6, 16])
    return nn.Sequential(
        nn.Conv2d(channels, first, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(first, second, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(second * (height // 4) * (width // 4), 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )
