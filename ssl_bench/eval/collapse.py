"""Collapse diagnostics: teacher entropy, KL(teacher || student), RankMe, feature spread.

DINO (Caron et al. 2021, Sec. 5.3, Fig. 7) tracks the entropy of the teacher's
targets and the KL divergence between teacher and student: without centering the
entropy falls to 0 (one prototype wins), without sharpening it rises to log K
(uniform targets), and in both cases the KL falls to 0 (the student has nothing
left to learn). RankMe (Garrido et al. 2023) is the exponential of the entropy of
the normalised singular values of a batch of embeddings; the mean per-dimension
standard deviation of L2-normalised features is ~1/sqrt(D) when they spread and 0
when they collapse (SimSiam, Chen & He 2021).

Each diagnostic raises ``NonFiniteFeaturesError`` (with counts) on NaN/inf inputs instead of
returning NaN or failing inside an SVD; ``what`` names the input in that message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ssl_bench.eval.finite import FiniteTally, check_finite

EPS = 1e-12


@torch.no_grad()
def target_entropy(probs: torch.Tensor, what: str = "collapse diagnostics: teacher targets") -> float:
    """Mean over rows of ``-sum_k p_k log p_k``. Args: probs: (N, K) rows summing to 1."""
    check_finite(probs, what)
    p = probs.float()
    return float(-(p * torch.log(p.clamp_min(EPS))).sum(dim=-1).mean())


@torch.no_grad()
def kl_teacher_student(teacher_probs: list[torch.Tensor], student_logits: list[torch.Tensor],
                       student_temp: float, what: str = "collapse diagnostics") -> float:
    """Mean KL(P_t || P_s) over the pairs the DINO loss uses (teacher view i, student view j != i).

    Args:
        teacher_probs: targets of the global views, each (B, K).
        student_logits: student outputs of all views, each (B, K); the first ones are the global views.
        student_temp: tau_s.
        what: prefix of the non-finite error's message.
    """
    for name, views in ((f"{what}: teacher targets", teacher_probs), (f"{what}: student logits", student_logits)):
        tally = FiniteTally(f"{name} of {len(views)} views")  # one sync per list, rows summed over views
        for v in views:
            tally.add(v)
        tally.check()
    total, pairs = 0.0, 0
    for i, p in enumerate(teacher_probs):
        p = p.float()
        log_p = torch.log(p.clamp_min(EPS))
        for j, s in enumerate(student_logits):
            if i == j:
                continue
            log_q = F.log_softmax(s.float() / student_temp, dim=-1)
            total += float((p * (log_p - log_q)).sum(dim=-1).mean())
            pairs += 1
    return total / max(pairs, 1)


@torch.no_grad()
def rankme(embeddings: torch.Tensor, what: str = "collapse diagnostics: RankMe embeddings") -> float:
    """Effective rank ``exp(H(sigma / ||sigma||_1))`` of (N, D) embeddings; between 1 and min(N, D)."""
    check_finite(embeddings, what)  # an SVD of NaNs fails to converge or returns NaN
    sigma = torch.linalg.svdvals(embeddings.float())
    p = sigma / sigma.sum().clamp_min(EPS) + EPS
    return float(torch.exp(-(p * torch.log(p)).sum()))


@torch.no_grad()
def feature_std(features: torch.Tensor, what: str = "collapse diagnostics: feature-std features") -> float:
    """Mean over dimensions of the batch std of L2-normalised (N, D) features (collapsed: 0)."""
    check_finite(features, what)
    return float(F.normalize(features.float(), dim=-1).std(dim=0).mean())


def diagnostics(targets: list[torch.Tensor], student_logits: list[torch.Tensor], teacher_cls: torch.Tensor,
                student_temp: float) -> dict[str, float]:
    """The four diagnostics of one measurement (the names after ``collapse/`` in metrics.jsonl).

    Args: targets: teacher probabilities of the global views, (B, K) each; student_logits: every view,
    (B, K) each, globals first; teacher_cls: (N, D) teacher CLS features; student_temp: tau_s.
    """
    return {"teacher_entropy": target_entropy(torch.cat(targets)),
            "kl_teacher_student": kl_teacher_student(targets, student_logits, student_temp),
            "rankme": rankme(teacher_cls), "feature_std": feature_std(teacher_cls)}


REASON_ENTROPY_ZERO = "teacher entropy -> 0: one prototype dominates (no centering?)"
REASON_ENTROPY_UNIFORM = "teacher entropy -> log K: uniform targets (no sharpening?)"
REASON_KL_ZERO = "KL(teacher || student) -> 0: the student has nothing left to learn"


@dataclass
class CollapseMonitor:
    """Calls a run collapsed when one sign of collapse holds for ``window`` diagnostics in a row.

    Signs: entropy <= entropy_low * log K (one prototype dominates), entropy >= entropy_high * log K
    (uniform targets), KL <= kl_threshold nats (the student has caught up with the teacher). The
    uniform bound must be tight: at the student's temperature the targets of a freshly initialised
    head already sit at ~97% of log K. A healthy DINO run stays between the bounds with its KL
    well above a few hundredths of a nat (README, collapse study).
    """

    num_prototypes: int
    entropy_low: float = 0.1
    entropy_high: float = 0.98
    kl_threshold: float = 0.02
    window: int = 5
    collapsed_step: Optional[int] = None
    reason: Optional[str] = None
    _streaks: dict[str, tuple[int, int]] = field(default_factory=dict)  # reason -> (first step, count)

    @property
    def log_k(self) -> float:
        return math.log(self.num_prototypes)

    def signs(self, entropy: float, kl: float) -> list[str]:
        found = []
        if entropy <= self.entropy_low * self.log_k:
            found.append(REASON_ENTROPY_ZERO)
        if entropy >= self.entropy_high * self.log_k:
            found.append(REASON_ENTROPY_UNIFORM)
        if kl <= self.kl_threshold:
            found.append(REASON_KL_ZERO)
        return found

    def update(self, step: int, entropy: float, kl: float) -> bool:
        """Feed one diagnostic; returns True once the run is collapsed (and stays True)."""
        current = self.signs(entropy, kl)
        self._streaks = {r: (self._streaks.get(r, (step, 0))[0], self._streaks.get(r, (step, 0))[1] + 1)
                         for r in current}
        if self.collapsed_step is None:
            for r, (first, count) in self._streaks.items():
                if count >= self.window:
                    self.collapsed_step, self.reason = first, r
                    break
        return self.collapsed_step is not None

    def state_dict(self) -> dict:
        """Streaks and verdict, so a resumed run judges collapse as an uninterrupted one would."""
        return {"collapsed_step": self.collapsed_step, "reason": self.reason,
                "streaks": {reason: list(value) for reason, value in self._streaks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.collapsed_step, self.reason = state["collapsed_step"], state["reason"]
        self._streaks = {reason: tuple(value) for reason, value in state["streaks"].items()}

    def summary(self) -> dict:
        return {"collapsed": self.collapsed_step is not None, "collapse_step": self.collapsed_step,
                "collapse_reason": self.reason, "log_k": round(self.log_k, 4),
                "entropy_low": self.entropy_low, "entropy_high": self.entropy_high,
                "kl_threshold": self.kl_threshold, "window": self.window}
