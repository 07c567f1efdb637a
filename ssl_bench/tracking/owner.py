"""Who owns a "running" record: the process that writes it, and whether it is lost.

A record names its owner (``repro.owner()``: host, pid, start time, heartbeat); a run whose owner is
gone is reported as lost, never as running (grid status, resume).
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import Any, Mapping

from ssl_bench import repro

# The process that writes a "running" result.json (repro.owner()) and how long its heartbeat may be silent.
OWNER_KEY = "owner"
LOST_AFTER_S = 30 * 60  # an owner on another host without a heartbeat for this long is lost
_PID_REUSE_SLACK_S = 5.0  # started_at has whole seconds; a process started later than this is another one


def check_owner(owner: Any, now: float | None = None) -> tuple[bool, str | None]:
    """(lost, note) for the owner of a "running" record, judged from this host without SLURM.

    On this host: lost when its pid is gone, or now belongs to a process started after the run did.
    Elsewhere: lost when the heartbeat is older than LOST_AFTER_S; else the note gives its age.
    A record without a readable owner (older versions) is never called lost.
    """
    if not isinstance(owner, Mapping):
        return False, None
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        if not repro.pid_alive(pid):
            return True, f"process {pid} on {host} is gone"
        began, started = repro.process_start_time(pid), _epoch(owner.get("started_at"))
        if began is not None and started is not None and began > started + _PID_REUSE_SLACK_S:
            return True, f"pid {pid} on {host} is another process now"
        return False, None
    beat = _epoch(owner.get("heartbeat_at"))
    if beat is None:
        return False, None
    minutes = int(max(0.0, (time.time() if now is None else now) - beat) // 60)
    if minutes * 60 >= LOST_AFTER_S:
        return True, f"no heartbeat for {minutes} min"
    return False, f"heartbeat {minutes} min ago"


def _epoch(stamp: Any) -> float | None:
    """Epoch seconds of a repro.utc_now() timestamp (None when absent or unreadable)."""
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else None
    except ValueError:
        return None
