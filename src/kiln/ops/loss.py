"""NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.

Scores are (N, C) or (N, C, d1, ..., dk) with int targets (N) or (N, d1, ..., dk). Targets equal to
``ignore_index`` contribute nothing and do not count in the mean; with class weights, the mean
divides by the total weight of the counted targets.
"""

from __future__ import annotations

import torch

from kiln.ops.registry import register


def _negative_log_likelihood(
    log_probs: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int | None,
    reduction: str,
) -> torch.Tensor:
    target = target.long()
    if ignore_index is None:
        ignored = torch.zeros_like(target, dtype=torch.bool)
    else:
        ignored = target == ignore_index
    # Ignored targets may name no class at all: gather class 0 for them, then weigh them 0.
    safe_target = torch.where(ignored, torch.zeros_like(target), target)
    picked = -log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    weights = torch.ones_like(picked) if weight is None else weight.to(picked.dtype)[safe_target]
    weights = torch.where(ignored, torch.zeros_like(weights), weights)
    loss = picked * weights
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weights.sum()


@register("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(x, target, weight=None, *, ignore_index=None, reduction="mean"):
    return _negative_log_likelihood(x, target, weight, ignore_index, reduction)


@register("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(
    scores, labels, weights=None, *, ignore_index=None, reduction="mean"
):
    log_prob = torch.log_softmax(scores, dim=1)
    return _negative_log_likelihood(log_prob, labels, weights, ignore_index, reduction), log_prob
