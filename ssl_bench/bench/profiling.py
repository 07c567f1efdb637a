"""Where a training step's time goes: torch's profiler over the timed steps, as milliseconds per step by op.

``bench compare --profile`` runs one extra round after the timed ones, with every loop under the profiler. The
profiler slows small ops, so those runs do not enter the medians. What they give is the same ops, measured the
same way, side by side: ``aten::addmm`` of ssl-bench's step beside the official loop's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

def step_profiler(warmup: int, steps: int) -> torch.profiler.profile:
    """A CPU profiler that records the ``steps`` steps after ``warmup``; call ``.step()`` after every step."""
    schedule = torch.profiler.schedule(wait=max(warmup - 1, 0), warmup=min(warmup, 1), active=steps, repeat=1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False)


def ops_per_step(prof: torch.profiler.profile, steps: int) -> dict[str, Any]:
    """Self CPU milliseconds and calls per step of every op (costliest first), and their total."""
    events = sorted(((e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()),
                    key=lambda e: -e[1])
    return {"self_cpu_ms_per_step": {k: round(ms, 3) for k, ms, _ in events},
            "calls_per_step": {k: round(n, 2) for k, _, n in events},
            "total_self_cpu_ms_per_step": round(sum(ms for _, ms, _ in events), 3), "steps": steps}


def compare_ops(profiles: dict[str, dict[str, Any]], base: str, top: int = 15) -> str:
    """A Markdown table: the ops where the loops differ most (ms per step), against the ``base`` loop."""
    names = list(profiles)
    ops: set[str] = set()
    for p in profiles.values():
        ops.update(p["self_cpu_ms_per_step"])

    def ms(name: str, op: str) -> Optional[float]:
        return profiles[name]["self_cpu_ms_per_step"].get(op)

    def gap(op: str) -> float:
        return max(abs((ms(n, op) or 0.0) - (ms(base, op) or 0.0)) for n in names)

    lines = ["| op | " + " | ".join(f"{n} ms/step" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for op in sorted(ops, key=gap, reverse=True)[:top]:
        cells = ["-" if ms(n, op) is None else f"{ms(n, op):.1f}" for n in names]  # "-": the loop never calls it
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    lines.append("| all ops | " + " | ".join(f"{profiles[n]['total_self_cpu_ms_per_step']:.1f}" for n in names) + " |")
    return "\n".join(lines)
