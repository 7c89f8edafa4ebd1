"""The report's AlexNet for 32x32 CIFAR-10 images. Pure torch.

Layer for layer as in the report's public code: five 3x3 convolutions (the first with stride 1,
unlike ImageNet AlexNet's 11x11 stride 4, which would shrink a 32x32 image to nothing), three
max-pools to 4x4, then FC 4096-4096-10 with dropout before each hidden FC layer. About 35.9M
parameters, 33.6M of them in the FC layers.

The network takes raw uint8 images (N, 3, 32, 32) and normalises them itself, so a logged model
needs no preprocessing code beside it: the training's normalisation travels with the weights.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)

ACTIVATION_LAYERS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
}


class Normalize(nn.Module):
    """uint8 pixels in [0, 255] -> (x / 255 - mean) / std, folded into one multiply-add."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * std)))
        self.register_buffer("shift", torch.tensor(-mean / std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.scale.dtype) * self.scale + self.shift


class AlexNet(nn.Module):
    def __init__(
        self,
        activation: str = "relu",
        dropout: float = 0.8,
        batch_norm: bool = False,
        norm_mean: float = 0.5,
        norm_std: float = 0.5,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        act = ACTIVATION_LAYERS[activation]

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            # Batch norm makes the conv bias redundant; keep it anyway so that parameter names
            # match with and without batch norm.
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            return layers + [act()]

        self.normalize = Normalize(norm_mean, norm_std)
        self.features = nn.Sequential(
            *conv(3, 64), nn.MaxPool2d(2),  # 32 -> 16
            *conv(64, 192), nn.MaxPool2d(2),  # 16 -> 8
            *conv(192, 384),
            *conv(384, 256),
            *conv(256, 256), nn.MaxPool2d(2),  # 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(256 * 4 * 4, 4096), act(),
            nn.Dropout(dropout), nn.Linear(4096, 4096), act(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(images)))


def build_model(config) -> AlexNet:
    """The network a `TrainConfig` describes."""
    return AlexNet(
        activation=config.activation,
        dropout=config.dropout,
        batch_norm=config.batch_norm,
        norm_mean=config.norm_mean,
        norm_std=config.norm_std,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module) -> int:
    """FLOPs of one image's forward pass, counted by torch's FlopCounterMode (a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *IMAGE_SHAPE, dtype=torch.uint8))
    model.train(was_training)
    return counter.get_total_flops()
