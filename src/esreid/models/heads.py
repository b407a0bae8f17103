"""BNNeck: batch norm between the pooled feature and the identity classifier (Bag of Tricks)."""

from __future__ import annotations

import torch
from torch import nn


class BNNeck(nn.Module):
    """BatchNorm1d without a learned bias shift, followed by a bias-free linear classifier.

    ``forward(feat [N, D]) -> (bn_feat [N, D], logits [N, num_classes])``. The triplet loss
    uses the feature before the BN, the classifier and retrieval the one after it.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        # Freezing the shift keeps the BN feature centred, which is what makes the same
        # vector work for both the softmax and cosine retrieval.
        self.bn.bias.requires_grad_(False)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn_feat = self.bn(feat)
        return bn_feat, self.classifier(bn_feat)
