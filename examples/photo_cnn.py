"""The user's own network for examples/sample_photos.py: a small CNN with no `features`
method and none of shieldserve's layer names (shieldserve finds its penultimate layer itself)."""

from __future__ import annotations

import torch
from torch import nn


class PhotoCNN(nn.Module):
    def __init__(self, num_classes: int = 8) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.fc1 = nn.Linear(32 * 16, 64)
        self.classify = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.conv(x).flatten(1)))
        return self.classify(h)
