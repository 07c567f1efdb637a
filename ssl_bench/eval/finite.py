"""Evaluation refuses non-finite features: a NaN or inf is an error that counts them, never an accuracy.

Why a check is needed: a NaN similarity or logit makes every comparison false, so ranking code treats
it as a winner (an all-NaN k-NN bank scored top-1 = 100%). Each check counts on the device and
syncs with the host once (``FiniteTally.check``), so a per-batch tally costs no sync per batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ssl_bench import dist

__all__ = ["NonFiniteFeaturesError", "FiniteTally", "check_finite"]

_BLOCK = 65536  # rows counted at a time, so a large bank never needs a full-size boolean mask


class NonFiniteFeaturesError(ValueError):
    """Features (or outputs computed from them) hold NaN/inf; nothing is scored from them.

    Attributes: what (the evaluated tensor, in words), bad_rows of rows (samples with a non-finite
    value), nan and inf of values (single values).
    """

    def __init__(self, what: str, bad_rows: int, rows: int, nan: int, inf: int, values: int) -> None:
        self.what, self.bad_rows, self.rows, self.nan, self.inf, self.values = what, bad_rows, rows, nan, inf, values
        super().__init__(f"{what}: {bad_rows} of {rows} rows (samples) hold NaN or inf ({nan} NaN and {inf} inf "
                         f"among {values} values); non-finite features are never evaluated, since they would "
                         f"give a meaningless number")

    def __reduce__(self):  # picklable across processes (spawned ranks, submitit), despite the custom __init__
        return type(self), (self.what, self.bad_rows, self.rows, self.nan, self.inf, self.values)


def _rows(t: Tensor) -> Tensor:
    """(N, rest) view: dim 0 is the sample axis; a 0-d tensor is one sample, a 1-d one N samples of 1 value."""
    return t.reshape(1, 1) if t.dim() == 0 else t.unsqueeze(1) if t.dim() == 1 else t.flatten(1)


class FiniteTally:
    """Non-finite counts of one evaluated quantity, accumulated on the device over batches.

    ``add`` launches a few reductions and never syncs; ``check`` syncs once and raises
    ``NonFiniteFeaturesError`` if anything was not finite.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.rows = self.values = 0
        self._counts: Optional[Tensor] = None  # (3,) int64: bad rows, NaN values, inf values

    def add(self, *parts: Optional[Tensor]) -> None:
        """Count one batch. Args: parts: tensors (N, ...) with the same N (None skipped); a row is bad if any
        part has a non-finite value in it."""
        views = [_rows(p) for p in parts if p is not None]
        if not views:
            return
        n = views[0].shape[0]
        if any(v.shape[0] != n for v in views):
            raise ValueError(f"{self.what}: parts have different numbers of rows {[v.shape[0] for v in views]}")
        self.rows += n
        self.values += sum(v.numel() for v in views)
        if self._counts is None:  # on the features' device, also for an empty shard (its collective needs one)
            self._counts = torch.zeros(3, dtype=torch.long, device=views[0].device)
        floats = [v for v in views if v.is_floating_point() or v.is_complex()]  # integers are always finite
        for start in range(0, n if floats else 0, _BLOCK):
            blocks = [v[start:start + _BLOCK] for v in floats]
            bad_row = ~torch.isfinite(blocks[0]).all(dim=1)
            for b in blocks[1:]:
                bad_row |= ~torch.isfinite(b).all(dim=1)
            self._counts += torch.stack([bad_row.sum(), sum(torch.isnan(b).sum() for b in blocks),
                                         sum(torch.isinf(b).sum() for b in blocks)])

    def check(self, sharded: bool = False) -> None:
        """Raise if anything added was not finite; one host sync.

        ``sharded=True`` (every rank must call it): counts are summed over ranks first, so every rank
        raises together, with the global counts, and none is left waiting in a later collective.
        """
        counts = self._counts if self._counts is not None else torch.zeros(3, dtype=torch.long)
        packed = torch.cat([counts, torch.tensor([self.rows, self.values], device=counts.device)])
        if sharded and dist.is_distributed():
            dist.all_reduce_sum(packed)
        elif self._counts is None:
            return
        bad_rows, nan, inf, rows, values = packed.tolist()
        if bad_rows:
            raise NonFiniteFeaturesError(self.what, bad_rows, rows, nan, inf, values)


def check_finite(features: Tensor | tuple[Optional[Tensor], ...], what: str, *, sharded: bool = False) -> None:
    """Raise ``NonFiniteFeaturesError`` (with counts) unless every value of ``features`` is finite.

    Args:
        features: (N, ...) tensor, or a tuple of parts with the same N (one sample = one row of each).
        what: the evaluated tensor in words, e.g. "k-NN bank features"; it starts the message.
        sharded: each rank holds a shard of the rows; see ``FiniteTally.check``.
    """
    tally = FiniteTally(what)
    tally.add(*(features if isinstance(features, tuple) else (features,)))
    tally.check(sharded)
