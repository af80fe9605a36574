"""The training loss: sigmoid cross-entropy with positive voxels weighted (method spec: 10x), optionally plus
a soft Dice term (batch-wise, on the sigmoid probabilities)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["segmentation_loss"]


def segmentation_loss(logits: Tensor, target: Tensor, *, positive_weight: float = 10.0, dice_weight: float = 0.0,
                      eps: float = 1.0) -> Tensor:
    """Mean weighted BCE over all voxels (+ ``dice_weight`` x (1 - soft Dice)); ``logits``/``target`` (B, 1, H, W).

    ``eps`` (in voxels) keeps the Dice term defined, and near zero, for a batch with no lesion predicted or true."""
    logits = logits.float()
    pw = torch.tensor(positive_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
    if dice_weight > 0:
        p = torch.sigmoid(logits)
        inter = (p * target).sum()
        dice = (2 * inter + eps) / (p.sum() + target.sum() + eps)
        loss = loss + dice_weight * (1 - dice)
    return loss
