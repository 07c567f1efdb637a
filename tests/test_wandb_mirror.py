"""The W&B mirror (ssl_bench/tracking/wandb_mirror.py) with the real wandb library in offline mode.

wandb >= 0.31 keeps an offline run's config and summary only in its ``.wandb`` transaction log, so
``read_records`` parses that log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then LevelDB-style
32 KiB blocks of chunks, each with a 7-byte header (crc32, length u16, type u8: 1 full, 2 first,
3 middle, 4 last) around a serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from ssl_bench import config as config_lib
from ssl_bench.tracking import wandb_mirror as mirror

SHA = "0123456789abcdef0123456789abcdef01234567"
ENV = {"git": {"sha": SHA, "dirty": False, "branch": "main"}, "versions": {"wandb": "0.31.0"},
       "hardware": {"hostname": "node1", "cuda": False}, "world_size": 2, "seed": 0}
TAGS = ["method.teacher_temp=0.04", "seed=0"]
RESULT = {"run_id": "r", "status": "completed", "metrics": {"knn_top1": 61.25, "knn_top1_init": 12.5, "knn_top5": 88.0},
          "timing": {"train_s": 3.5, "train_steps": 20},
          "collapse": {"collapsed": False, "collapse_step": None, "last": {"collapse/rankme": 3.0}},
          "protocol": {"knn": {"k": 20}}}


def read_records(path: Path) -> tuple[list[Any], bytes]:
    """The Records of a ``.wandb`` file and their bytes joined (block headers removed)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, chunk, records, payload = 32768, 7, b"", [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunk))
            payload += chunk
            chunk = b""
    return records, payload


def run_info(path: Path) -> dict[str, Any]:
    """Id, group, tags, name, config, final summary and exit code of one offline run."""
    info: dict[str, Any] = {"summary": {}}
    for record in read_records(path)[0]:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(id=run.run_id, group=run.run_group, tags=list(run.tags), name=run.display_name,
                        resume=run.resume, config={u.key: json.loads(u.value_json) for u in run.config.update})
        elif kind == "summary":
            for u in record.summary.update:
                info["summary"][u.key or ".".join(u.nested_key)] = json.loads(u.value_json)
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    return info


def offline_runs(directory: Path, timeout: float = 30.0) -> list[Path]:
    """The offline runs' logs, once each ends in its exit record.

    ``run.finish()`` can return before wandb-core has flushed the log (seen in CI: a log without its
    run record yet), so this waits, up to ``timeout`` seconds, for the writer to catch up.
    """
    deadline = time.time() + timeout
    while True:
        runs = sorted((directory / "wandb").glob("offline-run-*/run-*.wandb"))
        if (runs and all(map(_ends_in_exit, runs))) or time.time() > deadline:
            return runs
        time.sleep(0.05)


def _ends_in_exit(path: Path) -> bool:
    try:
        records = read_records(path)[0]
    except Exception:  # a chunk still being written
        return False
    return bool(records) and records[-1].WhichOneof("record_type") == "exit"


def wandb_descendants() -> list[str]:
    """Names of this process's descendants that belong to wandb (wandb-core, its system monitor)."""
    parents: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z":  # a zombie already ended
            parents[int(stat.parent.name)] = (int(fields[1]), text[text.index("(") + 1:text.rindex(")")])
    found, frontier = [], {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in parents.items() if ppid in frontier}
        found += [parents[pid][1] for pid in frontier]
    return [name for name in found if "wandb" in name]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb confined to tmp_path, silent, offline-capable; its service is stopped after the test."""
    import wandb

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "home" / ".cache" / "wandb"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wandb.teardown()  # a fresh wandb singleton reads this environment (and no earlier run is reused)
    yield tmp_path
    wandb.teardown()
    deadline = time.time() + 10
    while wandb_descendants() and time.time() < deadline:
        time.sleep(0.1)
    assert not wandb_descendants(), "wandb processes outlived the test"


def offline_cfg(tmp_path: Path, study: str = "ablation") -> config_lib.Config:
    tracking = {"wandb": "offline", "runs_root": str(tmp_path / "runs")}
    cfg = config_lib.build_config({"study": study, "tracking": tracking, "optim": {"lr": 0.00123}})
    cfg.tracking.wandb_tags = list(TAGS)  # the launcher fills these from the grid axes
    return cfg


def test_offline_run_records_config_tags_group_summary_and_resumes_same_id(wandb_env):
    cfg = offline_cfg(wandb_env)
    run_id, directory = config_lib.run_id(cfg), config_lib.run_dir(cfg)
    logger = mirror.wandb_logger(cfg, run_id, directory, ENV)
    assert not (directory / "wandb").exists()  # lazily created, on first use
    logger.log_hyperparams({})  # what Lightning does at fit start
    logger.log_metrics({"train/loss": 2.5}, step=4)
    mirror.publish_result(logger, RESULT)
    # A requeued attempt: a new logger, same run id.
    again = mirror.wandb_logger(cfg, run_id, directory, ENV)
    again.log_metrics({"train/loss": 2.0}, step=8)
    mirror.publish_result(again, {**RESULT, "metrics": {"knn_top1": 62.0}})

    runs = offline_runs(directory)
    assert len(runs) == 2, list((directory / "wandb").iterdir())
    first, second = run_info(runs[0]), run_info(runs[1])
    assert first["id"] == second["id"] == f"ablation-{run_id}"
    assert first["name"] == run_id and first["group"] == "ablation" and first["resume"]
    assert sorted(first["tags"]) == sorted([*TAGS, "dino"])
    config = first["config"]
    assert config["optim"]["lr"] == 0.00123 and config["study"] == "ablation" and config["run_id"] == run_id
    assert config["env"]["git"]["sha"] == SHA and config["env"]["world_size"] == 2
    assert config["tracking"]["wandb"] == "offline" and config["run_dir"] == str(directory)
    summary = first["summary"]
    assert summary["knn_top1"] == 61.25 and summary["knn_top1_init"] == 12.5 and summary["status"] == "completed"
    assert summary["timing/train_s"] == 3.5 and summary["timing/train_steps"] == 20
    assert summary["collapse/collapsed"] is False and summary["collapse/collapse_step"] is None
    assert summary["train/loss"] == 2.5 and not any(k.startswith(("collapse/last", "protocol")) for k in summary)
    assert first["exit_code"] == 0
    assert second["summary"]["knn_top1"] == 62.0 and second["summary"]["train/loss"] == 2.0


def test_api_key_never_written_and_failed_run_exits_nonzero(wandb_env, monkeypatch):
    secret, hf = secrets.token_hex(20), "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = offline_cfg(wandb_env)
    cfg.backbone.kwargs = {"class_token": True}  # a ViT flag named like a credential stays
    run_id, directory = config_lib.run_id(cfg), config_lib.run_dir(cfg)
    env = {**ENV, "environ": {"WANDB_API_KEY": secret, "HF_TOKEN": hf, "PATH": "/usr/bin"}, "argv": ["--key", secret]}
    logger = mirror.wandb_logger(cfg, run_id, directory, env)
    logger.log_hyperparams({})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    mirror.publish_result(logger, {"status": "failed", "error": f"RuntimeError: bad key {secret}"})

    (run,) = offline_runs(directory)
    info = run_info(run)
    assert info["config"]["env"]["environ"] == {"WANDB_API_KEY": "***", "HF_TOKEN": "***", "PATH": "/usr/bin"}
    assert info["config"]["env"]["argv"] == ["--key", "***"] and info["config"]["backbone"]["kwargs"]["class_token"]
    assert info["summary"]["status"] == "failed" and info["summary"]["error"] == "***"
    assert info["exit_code"] == 1
    assert secret.encode() not in read_records(run)[1]  # also across the log's block boundaries
    files = [p for p in wandb_env.rglob("*") if p.is_file()]
    assert len(files) >= 3, files
    leaks = [p for p in files if secret.encode() in p.read_bytes() or hf.encode() in p.read_bytes()]
    assert not leaks


def test_check_wandb_needs_credentials_only_online(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc here
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    cfg = {mode: config_lib.build_config({"tracking": {"wandb": mode}}) for mode in ("off", "offline", "online")}
    mirror.check_wandb(cfg["off"])
    mirror.check_wandb(cfg["offline"])
    with pytest.raises(config_lib.ConfigError) as err:
        mirror.check_wandb(cfg["online"])
    for hint in ("WANDB_API_KEY", "wandb login", "tracking.wandb=offline"):
        assert hint in str(err.value)
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine other.example.org\n  login user\n  password {'a' * 40}\n")
    netrc.chmod(0o600)
    with pytest.raises(config_lib.ConfigError):  # a key for another server does not count
        mirror.check_wandb(cfg["online"])
    netrc.write_text(f"machine wandb.example.org\n  login user\n  password {'a' * 40}\n")
    mirror.check_wandb(cfg["online"])
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    mirror.check_wandb(cfg["online"])


def test_scrub_secrets_masks_credentials_only(monkeypatch):
    key = "k" * 40
    tree = {"tracking": {"wandb_api_key": "abc", "wandb": "online", "token": None},
            "backbone": {"kwargs": {"class_token": True, "reg_tokens": 4, "num_tokens": "x"}},
            "env": {"HF_TOKEN": "hf_x", "db": {"Password": {"a": 1}}, "secrets": ["s"], "tokenizer": "bpe"},
            "argv": ["--key", key, ("t", f"url?key={key}")], "n": 3}
    expected = {"tracking": {"wandb_api_key": "***", "wandb": "online", "token": None},
                "backbone": {"kwargs": {"class_token": True, "reg_tokens": 4, "num_tokens": "x"}},
                "env": {"HF_TOKEN": "***", "db": {"Password": "***"}, "secrets": "***", "tokenizer": "bpe"},
                "argv": ["--key", "***", ("t", "***")], "n": 3}
    assert mirror.scrub_secrets(tree, (key,)) == expected
    monkeypatch.setenv("WANDB_API_KEY", key)  # the default: the current key
    assert mirror.scrub_secrets(tree) == expected
    monkeypatch.setenv("WANDB_API_KEY", "ab")  # too short to search for: "abc" would be hit
    assert mirror.scrub_secrets({"a": "abc"}) == {"a": "abc"}
    assert tree["tracking"]["wandb_api_key"] == "abc"  # the input is not modified


def test_summary_of_flattens_result():
    assert mirror.summary_of({**RESULT, "error": "E: x", "traceback": "long"}) == {
        "status": "completed", "error": "E: x", "knn_top1": 61.25, "knn_top1_init": 12.5, "knn_top5": 88.0,
        "timing/train_s": 3.5, "timing/train_steps": 20, "collapse/collapsed": False, "collapse/collapse_step": None}
    assert mirror.summary_of({"status": "failed"}) == {"status": "failed"}


def test_ids_tags_and_off_mode(tmp_path):
    assert mirror.wandb_run_id("main", "dino-1a2b3c4d") == "main-dino-1a2b3c4d"
    assert mirror.wandb_run_id("a/b: c", "dino-1") == "a_b__c-dino-1"
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    ids = {mirror.wandb_run_id(s, "dino-1a2b3c4d") for s in (long_a, long_b)}
    assert len(ids) == 2 and all(len(i) <= 64 and i.endswith("-dino-1a2b3c4d") for i in ids)
    cfg = config_lib.build_config({"study": "s"})
    cfg.tracking.wandb_tags = ["dino", " a ", "a", "y" * 80, ""]
    assert mirror.run_tags(cfg) == ["dino", "a", "y" * 64]
    assert mirror.wandb_logger(cfg, "dino-1", tmp_path) is None  # tracking.wandb=off
    mirror.publish_result(None, RESULT)  # no-op
