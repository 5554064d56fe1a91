"""SqueezeNet 1.1 (Iandola et al., 2016) in plain torch, exported to ONNX for the demo.

Run ``python examples/models/squeezenet.py`` to regenerate ``squeezenet1_1.onnx``: the
architecture of torchvision's ``squeezenet1_1`` with seeded random weights (no download needed).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128), Fire(256, 32, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256),
        )
        self.classifier = nn.Sequential(nn.Conv2d(512, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

        # torchvision's initialisation, so activations keep their scale through the network.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if module is self.classifier[0]:
                    nn.init.normal_(module.weight, std=0.01)
                else:
                    nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def main() -> None:
    torch.manual_seed(0)
    model = SqueezeNet11().eval()
    path = Path(__file__).with_name("squeezenet1_1.onnx")
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.randn(1, 3, 224, 224),), dynamo=True, input_names=["image"],
            output_names=["logits"], dynamic_shapes={"x": {0: batch}}, optimize=True,
        )
    program.save(str(path))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
