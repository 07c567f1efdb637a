"""Weighted k-NN classification, the DINO protocol (Caron et al. 2021, Sec. 4.1).

Reference: facebookresearch/dino ``eval_knn.knn_classifier``. Features are L2-normalised; each of
the k nearest bank items votes for its class with weight ``exp(cos_sim / T)``.

Scale. Test features are scored in chunks of ``chunk_size`` rows and the bank in blocks of
``bank_block`` rows (top-k per block, then merged), so the temporary similarity matrix is at most
chunk_size x bank_block. ``fp16_bank`` keeps the normalised bank in float16; under DDP
(``sharded=True``) each rank holds only its contiguous shard of the bank and the same full test set.

Canonical neighbour order: descending similarity, ties broken by ascending (global) bank index.
Given the same similarity values, the selected neighbours, their order and hence the accuracies do
not depend on chunking, blocking or sharding. Caveat: BLAS may round a dot product differently (by
~1 ulp, ~1e-7) in matmuls of different shapes, so bank items whose similarities agree to ~1e-7 but
sit in different blocks or shards may be ordered by that rounding instead of by index; duplicate
rows scored in the same matmul, and exactly representable features, always tie exactly.

Class ranking (top-1/top-5): descending vote score, ties broken by ascending class index; top-5 is
capped at ``num_classes``. An empty test set gives NaN accuracies (0 hits of 0 is undefined).

Non-finite features are an error (``NonFiniteFeaturesError``), checked before normalisation: a NaN
similarity fails every comparison and so ranks first, and an all-NaN bank would score 100%.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssl_bench import dist
from ssl_bench.dist import shard_range  # re-exported: feature extraction uses it to pick a rank's rows
from ssl_bench.eval.finite import check_finite

__all__ = ["FP16_SIM_ATOL", "Neighbours", "knn_accuracies", "knn_classify", "knn_neighbours", "knn_topk",
           "normalised_bank", "shard_range", "vote"]

# fp16 bank: each bank coordinate is rounded with relative error <= 2^-11, so by Cauchy-Schwarz a
# similarity with a unit query moves by <= 2^-11 ~ 4.9e-4 (CPU: fp32 matmul on the upcast block).
# On CUDA the matmul stays in half (query and output rounded too): <= ~1e-3 plus accumulation error.
FP16_SIM_ATOL = 1e-3
_NORMALISE_BLOCK = 65536  # rows normalised at a time, so an fp16 bank never needs a full fp32 copy


class Neighbours(NamedTuple):
    """The k nearest bank items per test item, in canonical order; all (M, k)."""

    sims: torch.Tensor  # float32 cosine similarities, descending
    indices: torch.Tensor  # long, global bank indices
    labels: torch.Tensor  # long, bank labels of those items


def normalised_bank(features: torch.Tensor, fp16: bool = False) -> torch.Tensor:
    """L2-normalised copy of the bank, float16 if ``fp16`` else float32, normalised block by block.

    Args:
        features: (N, D) bank features, any float dtype.
    """
    out = torch.empty(features.shape, dtype=torch.float16 if fp16 else torch.float32, device=features.device)
    for start in range(0, features.shape[0], _NORMALISE_BLOCK):
        out[start:start + _NORMALISE_BLOCK] = F.normalize(features[start:start + _NORMALISE_BLOCK].float(), dim=1)
    return out


def _similarities(query: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(q, b) float32 cosine similarities of a normalised query chunk (q, D) and bank block (b, D)."""
    if block.dtype == torch.float16 and block.device.type != "cuda":
        block = block.float()  # CPU half matmul is slow; upcasting one block keeps memory bounded
    return (query.to(block.dtype) @ block.T).float()


def _order_keys(sims: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is the canonical one: descending sim, then ascending index.

    High 32 bits: the float32 bit pattern of -sim mapped to a signed int of the same order; low 32
    bits: the index (< 2^32). One integer sort is several times faster than a stable float sort.
    """
    bits = (sims.neg() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0: equal sims, equal keys
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude sorts lower
    return (ordered << 32) | indices


def _select_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical k-subset of each row of ``sims`` (q, b): largest values, ties to lower columns.

    ``torch.topk`` picks an arbitrary subset among values equal to the k-th largest. Asking for k + 1
    shows which rows have such a tie (the (k+1)-th value equals the k-th); only those rows are redone
    with exact keys. Returns (values, columns), each (q, k), in no particular order.
    """
    if k >= sims.shape[1]:
        columns = torch.arange(sims.shape[1], device=sims.device).expand_as(sims)
        return sims, columns
    values, columns = sims.topk(k + 1, dim=1)
    tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
    values, columns = values[:, :k], columns[:, :k]
    if tied.numel():
        rows = sims[tied]
        keys = _order_keys(rows, torch.arange(rows.shape[1], device=rows.device).expand_as(rows))
        best = keys.topk(k, dim=1, largest=False).values
        columns[tied] = best & 0xFFFFFFFF
        values[tied] = rows.gather(1, columns[tied])
    return values, columns


def _canonical(cand: Neighbours, k: int) -> Neighbours:
    """The first k candidates of each row in canonical order: descending sim, then ascending index."""
    order = _order_keys(cand.sims, cand.indices).argsort(dim=1)[:, :k]  # keys are unique per row
    return Neighbours(*(t.gather(1, order) for t in cand))


def _merge(a: Neighbours, b: Neighbours, k: int) -> Neighbours:
    """Canonical top-k of the union of two candidate sets (exact: the canonical order is total)."""
    return _canonical(Neighbours(*(torch.cat(pair, dim=1) for pair in zip(a, b))), k)


def _chunk_neighbours(query: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, k: int,
                      bank_block: int | None, offset: int) -> Neighbours:
    """Canonical top-min(k, N) of one query chunk (q, D) against a local bank (N, D), block by block."""
    n = bank.shape[0]
    best = None
    step = bank_block or max(n, 1)
    for start in range(0, n, step):
        values, columns = _select_topk(_similarities(query, bank[start:start + step]), min(k, step, n - start))
        local = columns + start
        cand = Neighbours(values, local + offset, labels[local])
        best = _canonical(cand, k) if best is None else _merge(best, cand, k)
    if best is None:  # an empty shard contributes no candidates
        empty = torch.zeros(query.shape[0], 0, dtype=torch.long, device=query.device)
        return Neighbours(empty.float(), empty, empty)
    return best


def _gather_ranks(cand: Neighbours, k: int) -> Neighbours:
    """Global canonical top-k from every rank's candidates (rank r contributes (q, k_r) columns)."""
    # float64 holds float32 sims and integer indices/labels < 2^53 exactly: one collective, not three.
    packed = torch.stack([cand.sims.double(), cand.indices.double(), cand.labels.double()], dim=2)
    gathered = dist.all_gather_cat(packed.transpose(0, 1).contiguous()).transpose(0, 1)  # (q, sum k_r, 3)
    merged = Neighbours(gathered[..., 0].float(), gathered[..., 1].long(), gathered[..., 2].long())
    return _canonical(merged, k)


def _shard_layout(n_local: int, device: torch.device, sharded: bool) -> tuple[int, int]:
    """(global index of this rank's first bank row, global bank size) from all-gathered shard sizes."""
    if not (sharded and dist.is_distributed()):
        return 0, n_local
    sizes = dist.all_gather_cat(torch.tensor([n_local], dtype=torch.long, device=device)).tolist()
    return sum(sizes[:dist.rank()]), sum(sizes)


def knn_neighbours(train_features: torch.Tensor, train_labels: torch.Tensor | None, test_features: torch.Tensor,
                   k: int, chunk_size: int = 1024, *, bank_block: int | None = None, fp16_bank: bool = False,
                   sharded: bool = False) -> Neighbours:
    """Canonical k nearest bank items (k capped at the global bank size) of every test item.

    Args:
        train_features: (N, D) bank, or with ``sharded=True`` this rank's contiguous shard (N_r, D),
            shards in rank order (see ``shard_range``). train_labels: (N,) or (N_r,); None = zeros.
        test_features: (M, D); under ``sharded=True`` the same M rows on every rank.
        chunk_size: test rows scored at once. bank_block: bank rows scored at once (None = all).
        fp16_bank: keep the normalised bank in float16 (similarities within ``FP16_SIM_ATOL``).
        sharded: every rank of the initialised process group must call this (collectives); all get
            the same result. Ignored (one process) when torch.distributed is not initialised.
    Raises:
        NonFiniteFeaturesError: a NaN/inf in the bank (any rank's shard) or the test features.
    Returns:
        Neighbours of shape (M, k): sims, global bank indices, labels.
    """
    if k < 1 or chunk_size < 1 or (bank_block is not None and bank_block < 1):
        raise ValueError(f"k, chunk_size and bank_block must be >= 1, got {k}, {chunk_size} and {bank_block}")
    # Before normalisation (which turns an inf row into NaNs); a sharded bank is counted over all ranks.
    check_finite(train_features, "k-NN bank features", sharded=sharded)
    check_finite(test_features, "k-NN test features")  # the same rows on every rank: all raise together
    device = train_features.device
    offset, total = _shard_layout(train_features.shape[0], device, sharded)
    if not 0 < total < 2 ** 32:  # indices share an int64 sort key with the similarity (_order_keys)
        raise ValueError(f"k-NN needs a non-empty bank of fewer than 2^32 rows, got {total}")
    k = min(k, total)
    bank = normalised_bank(train_features, fp16_bank)
    labels = (torch.zeros(bank.shape[0], dtype=torch.long, device=device) if train_labels is None
              else train_labels.long().to(device))
    chunks = []
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].float().to(device), dim=1)
        cand = _chunk_neighbours(query, bank, labels, k, bank_block, offset)
        chunks.append(_gather_ranks(cand, k) if sharded and dist.is_distributed() else cand)
    if not chunks:
        empty = torch.zeros(0, k, dtype=torch.long, device=device)
        return Neighbours(empty.float(), empty, empty)
    return Neighbours(*(torch.cat(parts) for parts in zip(*chunks)))


def knn_topk(train_features: torch.Tensor, test_features: torch.Tensor, k: int, chunk_size: int = 1024, *,
             bank_block: int | None = None, fp16_bank: bool = False,
             sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and global bank indices of the k nearest bank items, canonical order.

    Args:
        train_features: (N, D) bank (this rank's shard if ``sharded``). test_features: (M, D).
        Keywords as in ``knn_neighbours``.
    Returns:
        sims (M, k) descending, indices (M, k) into the (global) bank.
    """
    found = knn_neighbours(train_features, None, test_features, k, chunk_size, bank_block=bank_block,
                           fp16_bank=fp16_bank, sharded=sharded)
    return found.sims, found.indices


def vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Class scores from neighbours: sum of exp(sim / T) per class.

    Args: sims, neighbour_labels: (M, k). Returns (M, num_classes).
    """
    weights = (sims / temperature).exp()
    scores = sims.new_zeros(sims.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 k: int, temperature: float, num_classes: int, chunk_size: int = 1024, *,
                 bank_block: int | None = None, fp16_bank: bool = False, sharded: bool = False) -> torch.Tensor:
    """(M, C) vote scores of the weighted k-NN classifier (k capped at the bank size)."""
    found = knn_neighbours(train_features, train_labels, test_features, k, chunk_size, bank_block=bank_block,
                           fp16_bank=fp16_bank, sharded=sharded)
    return vote(found.sims, found.labels, temperature, num_classes)


def label_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each true label among classes ordered by (-score, class index).

    Args: scores: (M, C). labels: (M,). Returns (M,) long. A count instead of a sort: O(M C), exact.
    """
    own = scores.gather(1, labels.view(-1, 1))
    lower = torch.arange(scores.shape[1], device=scores.device).view(1, -1) < labels.view(-1, 1)
    return (scores > own).sum(dim=1) + ((scores == own) & lower).sum(dim=1)


def knn_accuracies(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, ks: list[int], temperature: float, num_classes: int,
                   chunk_size: int = 1024, *, bank_block: int | None = None, fp16_bank: bool = False,
                   sharded: bool = False) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (%) for every k from one top-max(k) search; NaN for an empty test set.

    Args:
        train_features: (N, D) bank or, with ``sharded=True``, this rank's shard. train_labels: (N,).
        test_features: (M, D), test_labels: (M,); the full test set on every rank.
        Keywords as in ``knn_neighbours``.
    """
    found = knn_neighbours(train_features, train_labels, test_features, max(ks), chunk_size,
                           bank_block=bank_block, fp16_bank=fp16_bank, sharded=sharded)
    targets = test_labels.long().to(found.labels.device)
    out: dict[int, dict[str, float]] = {}
    for k in sorted(ks):
        rank = label_rank(vote(found.sims[:, :k], found.labels[:, :k], temperature, num_classes), targets)
        out[k] = {"top1": 100.0 * (rank < 1).float().mean().item(),
                  "top5": 100.0 * (rank < min(5, num_classes)).float().mean().item()}
    return out
