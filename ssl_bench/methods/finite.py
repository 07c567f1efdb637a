"""A device-side record of the first non-finite value of a run, and of fp16 steps the GradScaler skipped.

DESIGN.md habit 11: a diverged run fails with its step. Official DINO checks
``math.isfinite(loss.item())`` after every forward (facebookresearch/dino ``main_dino.py``
``train_one_epoch``), a host sync per step. Here every check is a tensor operation on the
training device; :meth:`FiniteWatch.verdict` is the one place that reads the record back
(``callbacks.NonFiniteGuard`` calls it at log steps, before every checkpoint write and at the end).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch

from ssl_bench import dist

# What can go non-finite, in the order a step computes it (the first one seen in a step is reported).
KINDS = ("teacher output", "loss", "DINO loss", "iBOT loss", "KoLeo loss", "gradient norm", "weights",
         "gradient norm (fp16 steps skipped in a row)")
SKIPS = KINDS.index("gradient norm (fp16 steps skipped in a row)")
NONE = torch.iinfo(torch.int64).max  # "no non-finite value yet" in the all-reduced code


class NonFiniteError(RuntimeError):
    """A non-finite value ended training; ``step`` is the step that produced it, as metrics.jsonl numbers
    steps (the global step before that step's update, from 0)."""

    def __init__(self, what: str, step: int, detail: str = "") -> None:
        super().__init__(f"non-finite {what} at step {step}" + (f" ({detail})" if detail else ""))
        self.what, self.step = what, step


class Verdict(NamedTuple):
    what: str
    step: int  # as metrics.jsonl counts: the global step before the offending update


class FiniteWatch:
    """First non-finite (kind, step) and the fp16 skipped-step counters, all as device tensors.

    Args:
        max_consecutive_skips: under fp16 a non-finite gradient norm is a step the GradScaler skips
            (it lowers its scale and retries), not a divergence; this many skips in a row is one.
    """

    def __init__(self, max_consecutive_skips: int = 20) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self._code: Optional[torch.Tensor] = None  # (step * len(KINDS) + kind) of the first non-finite value
        self._skips: Optional[torch.Tensor] = None  # [total skipped, skipped in a row]

    def _state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._code is None:
            self._code = torch.full((), NONE, dtype=torch.int64, device=device)
            self._skips = torch.zeros(2, dtype=torch.int64, device=device)
        elif self._code.device != device:  # the module moved (Lightning's setup): keep what was recorded
            self._code, self._skips = self._code.to(device), self._skips.to(device)
        return self._code, self._skips

    def observe(self, step: int, what: str, *tensors: torch.Tensor) -> None:
        """Record ``what`` at ``step`` (the global step before the update) if any of ``tensors`` holds a
        NaN or an inf; no host sync."""
        if not tensors:
            return
        self._state(tensors[0].device)
        bad = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()
        self._record(bad, step * len(KINDS) + KINDS.index(what))

    def _record(self, bad: torch.Tensor, value: int) -> None:
        self._code.copy_(torch.where(bad & (self._code == NONE), value, self._code))

    def observe_gradients(self, step: int, grad_norm: torch.Tensor, scaler_active: bool) -> None:
        """A non-finite total gradient norm: a divergence, or under fp16 a skipped step (counted)."""
        _, skips = self._state(grad_norm.device)
        bad = ~torch.isfinite(grad_norm)
        if not scaler_active:
            self._record(bad, step * len(KINDS) + KINDS.index("gradient norm"))
            return
        skips[0] += bad.long()
        skips[1] = torch.where(bad, skips[1] + 1, 0)
        self._record(skips[1] >= self.max_consecutive_skips, step * len(KINDS) + SKIPS)

    def observe_weights(self, step: int, modules: Iterable[torch.nn.Module]) -> None:
        """Record non-finite parameters after ``step`` updates (checked before a checkpoint is written);
        they are blamed on the last step, ``step - 1``."""
        # Under FSDP each rank checks its shard (``to_local``); ``verdict`` combines the ranks.
        params = [getattr(p, "to_local", p.detach)().detach() for m in modules for p in m.parameters()]
        if params:
            self._state(params[0].device)
            norms = torch.stack(torch._foreach_norm(params))
            self._record(~torch.isfinite(norms).all(), max(step - 1, 0) * len(KINDS) + KINDS.index("weights"))

    def verdict(self) -> Optional[Verdict]:
        """The earliest non-finite value on any rank, or None; every rank must call it (one all-reduce)."""
        if self._code is None:
            return None
        code = dist.all_reduce_max(-self._code.clone())  # min over ranks, through the max that dist offers
        value = int(-code.item())
        if value == NONE:
            return None
        step, kind = divmod(value, len(KINDS))
        return Verdict(KINDS[kind], step)

    def skipped_steps(self) -> int:
        """fp16 steps the GradScaler skipped so far (0 without a scaler)."""
        return 0 if self._skips is None else int(self._skips[0].item())

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps(),
                "skipped_in_a_row": 0 if self._skips is None else int(self._skips[1].item())}

    def load_state_dict(self, state: dict[str, int], device: torch.device) -> None:
        _, skips = self._state(device)
        skips.copy_(torch.tensor([state.get("skipped_steps", 0), state.get("skipped_in_a_row", 0)]))
