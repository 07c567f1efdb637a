"""The W&B mirror of a run directory: Lightning logger, final summary, secret scrubbing, credential check.

W&B mirrors the run directory and is never the only copy (DESIGN.md §1). Built on Lightning's
``WandbLogger`` (lightning 2.6), which creates the W&B run lazily on first use, and on wandb's own
credential lookup (WANDB_API_KEY, identity token file, netrc): we only look whether a key exists, and
mask it wherever it might be copied; we never pass or store one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_bench.config import Config, ConfigError, to_dict

if TYPE_CHECKING:  # the launcher calls check_wandb at plan time and must not pull in torch/Lightning
    from lightning.pytorch.loggers import Logger

# A credential's name as a whole word of a key: WANDB_API_KEY, hf_token, secret, db_password, credentials.
SECRET_KEY = re.compile(r"(?<![a-z])(api[_-]?key|token|secrets?|passw(or)?d|credentials?)(?![a-z])", re.IGNORECASE)
MASK = "***"
MIN_SECRET_LEN = 8  # a shorter "key" would mask ordinary strings that happen to contain it
# Characters wandb rejects in a run id (wandb_settings.validate_run_id), plus whitespace.
_RESERVED_ID_CHARS = re.compile(r"[:;,#?/'\\\s]")
MAX_ID_LEN = 64  # W&B's limit for a tag; ids are kept as short, since they appear in every run URL
STATUS_COMPLETED = "completed"  # tracking.STATUS_COMPLETED; tracking will import this module


def scrub_secrets(tree: Any, secrets: tuple[str, ...] | None = None) -> Any:
    """A copy of ``tree`` (nested dicts/lists) with secret-looking entries masked.

    A key naming a credential (api_key, token, secret, password, credentials; as a whole word, so
    ``num_tokens`` is not one) keeps its name, so a reader sees something was there, but a string or
    container value becomes ``MASK``; numbers and flags stay (ViT configs have ``class_token: true``).
    Any string containing one of ``secrets`` (default: the current WANDB_API_KEY) is masked wherever it sits.
    """
    if secrets is None:
        secrets = (os.environ.get("WANDB_API_KEY", ""),)
    secrets = tuple(s for s in secrets if len(s) >= MIN_SECRET_LEN)
    if isinstance(tree, Mapping):
        return {k: MASK if _secret_entry(k, v) else scrub_secrets(v, secrets) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(scrub_secrets(v, secrets) for v in tree)
    if isinstance(tree, str) and any(s in tree for s in secrets):
        return MASK
    return tree


def _secret_entry(key: Any, value: Any) -> bool:
    return bool(SECRET_KEY.search(str(key))) and not (value is None or isinstance(value, (bool, int, float)))


def wandb_run_id(study: str, run_id: str) -> str:
    """The W&B id of a run: ``<study>-<run_id>``.

    ``run_id`` leaves the study out of its hash (config.UNHASHED_KEYS), so the same config in two
    studies has the same run id; W&B ids are unique per project, and ``resume="allow"`` would merge
    the two. Reserved characters become ``_``; a study too long for the id is replaced by its hash.
    """
    study = _RESERVED_ID_CHARS.sub("_", study)
    if len(study) + 1 + len(run_id) > MAX_ID_LEN:
        study = hashlib.sha256(study.encode()).hexdigest()[:8]
    return f"{study}-{run_id}"


def run_tags(cfg: Config) -> list[str]:
    """``tracking.wandb_tags`` (e.g. the grid axes) and the method name, deduplicated, each 1-64 characters."""
    tags: list[str] = []
    for tag in [*getattr(cfg.tracking, "wandb_tags", []), cfg.method.name]:
        tag = str(tag).strip()[:MAX_ID_LEN]
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def run_config(cfg: Config, run_id: str, directory: Path, env: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the W&B run's config holds: the resolved config, ``env`` (env.json), run id and directory; scrubbed."""
    tree = {**to_dict(cfg), "env": dict(env or {}), "run_id": run_id, "run_dir": str(directory)}
    return scrub_secrets(tree)


def wandb_logger(cfg: Config, run_id: str, directory: Path, env: Mapping[str, Any] | None = None) -> Logger | None:
    """Lightning's WandbLogger mirroring the run directory, or None when ``tracking.wandb=off``.

    Args:
        cfg: the resolved config; ``tracking.wandb`` is the mode (online | offline), the study is the group.
        run_id: the run directory's id (``config.run_id``); the W&B id is ``wandb_run_id(study, run_id)``
            and ``resume="allow"`` makes a requeued attempt continue the same W&B run.
        directory: the run directory; W&B writes its files under ``<directory>/wandb``.
        env: the env.json record (git sha, versions, hardware, world size), stored under config["env"].
    """
    mode = cfg.tracking.wandb
    if mode == "off":
        return None
    from lightning.pytorch.loggers import WandbLogger

    # The run itself is created on first use (logger.experiment); every init argument below reaches it.
    logger = WandbLogger(project=cfg.tracking.wandb_project, entity=cfg.tracking.wandb_entity,
                         id=wandb_run_id(cfg.study, run_id), name=run_id, group=cfg.study, tags=run_tags(cfg),
                         config=run_config(cfg, run_id, directory, env), mode=mode, resume="allow",
                         save_dir=str(directory), job_type="train")
    # Lightning always passes anonymous=None, which recent wandb answers with a deprecation warning per run.
    init = getattr(logger, "_wandb_init", {})
    if init.get("anonymous", 0) is None:
        del init["anonymous"]
    return logger


def summary_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat W&B summary keys of a result.json record.

    Metrics keep their names (``knn_top1``); ``timing`` and ``collapse`` scalars get a prefix
    (``timing/train_s``, ``collapse/collapsed``); ``status`` and ``error`` are copied. Nested
    values (the collapse ``last`` values, the protocol) stay in result.json only.
    """
    out: dict[str, Any] = {k: result[k] for k in ("status", "error") if k in result}
    out.update({k: v for k, v in (result.get("metrics") or {}).items() if _scalar(v)})
    for section in ("timing", "collapse"):
        out.update({f"{section}/{k}": v for k, v in (result.get(section) or {}).items() if _scalar(v)})
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def publish_result(logger: Logger | None, result: Mapping[str, Any]) -> None:
    """Write the final result.json record to the W&B run summary and finish the run; no-op for None.

    A failed run (``status`` other than completed) finishes with exit code 1, so W&B marks it failed.
    The run is always finished: Lightning's logger would otherwise hand the still-open run to the next
    run started in this process. Only global rank 0 owns the W&B run; other ranks return.
    """
    if logger is None:
        return
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    run = logger.experiment
    run.summary.update(scrub_secrets(summary_of(result)))
    run.finish(exit_code=0 if result.get("status") == STATUS_COMPLETED else 1)


def has_credentials() -> bool:
    """Whether wandb will find credentials for its server: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a
    netrc entry for the base URL (what ``wandb login`` writes). Read fresh on every call; no key is returned.

    An ``api_key`` kept only in a wandb settings file is not looked at (wandb caches settings per process).
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or _settings_base_url()
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # knows wandb's host aliases
    except ImportError:  # older wandb: the stdlib reader on the same file
        return _stdlib_netrc_has(base_url)
    try:
        return read_netrc_auth(host=base_url) is not None
    except Exception:  # a malformed entry is still an entry; wandb.init reports it precisely
        return True


def _settings_base_url() -> str:
    """The server wandb talks to: its settings (``wandb login --host`` stores one), else W&B's cloud."""
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().settings.base_url
    except Exception:  # pragma: no cover - only if wandb's internals move
        return "https://api.wandb.ai"


def _stdlib_netrc_has(base_url: str) -> bool:
    import netrc
    from urllib.parse import urlsplit

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(base_url).netloc) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb(cfg: Config) -> None:
    """Fail at plan time, before any job is submitted, when ``tracking.wandb=online`` has no credentials.

    Offline and off need no key. Raises ConfigError with the ways to provide one.
    """
    mode = cfg.tracking.wandb
    if mode == "off":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tracking.wandb={mode} needs the wandb package (pip install wandb), "
                          "or set tracking.wandb=off") from exc
    if mode == "online" and not has_credentials():
        raise ConfigError("tracking.wandb=online but no W&B API key was found. Set WANDB_API_KEY in the "
                          "environment of the jobs, or run `wandb login` once (it writes ~/.netrc), or use "
                          "tracking.wandb=offline (sync later with `wandb sync <run_dir>/wandb`).")
