"""Weighted k-NN classification, the DINO protocol (Caron et al. 2021, Sec. 4.1).

Reference: facebookresearch/dino ``eval_knn.knn_classifier``. Features are
L2-normalised; each of the k nearest bank items votes for its class with
weight ``exp(cos_sim / T)``. Test features are scored in chunks so memory is
bounded by chunk_size x bank size, not test size x bank size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_topk(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
             chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices of the k nearest bank items per test item.

    Args:
        train_features: (N, D) bank. test_features: (M, D).
    Returns:
        sims (M, k) in descending order, indices (M, k) into the bank.
    """
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, idx = [], []
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        s, i = (query @ bank.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    if not sims:
        return bank.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Class scores from neighbours: sum of exp(sim / T) per class.

    Args: sims, neighbour_labels: (M, k). Returns (M, num_classes).
    """
    weights = (sims / temperature).exp()
    scores = sims.new_zeros(sims.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 k: int, temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """N_test x C vote scores of the weighted k-NN classifier (k capped at the bank size)."""
    sims, idx = knn_topk(train_features, test_features, k, chunk_size)
    return vote(sims, train_labels.long()[idx], temperature, num_classes)


def knn_accuracies(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, ks: list[int], temperature: float, num_classes: int,
                   chunk_size: int = 1024) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (%) for every k from one top-max(k) search."""
    sims, idx = knn_topk(train_features, test_features, max(ks), chunk_size)
    neighbour_labels = train_labels.long()[idx]
    out: dict[int, dict[str, float]] = {}
    for k in sorted(ks):
        scores = vote(sims[:, :k], neighbour_labels[:, :k], temperature, num_classes)
        ranked = scores.topk(min(5, num_classes), dim=1).indices
        hits = ranked == test_labels.long().view(-1, 1)
        out[k] = {"top1": 100.0 * hits[:, 0].float().mean().item(),
                  "top5": 100.0 * hits.any(dim=1).float().mean().item()}
    return out
