"""The ssl-bench command line, as a user types it."""

import subprocess
import sys

import pytest
import yaml

from ssl_bench.cli import main


def test_methods_lists_registered_methods_with_descriptions(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("dino", "dino_no_centering", "dino_no_sharpening"):
        assert any(line.split()[0] == name and len(line.split()) > 2 for line in out.splitlines())


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "methods"], capture_output=True, text=True)
    assert out.returncode == 0 and "dino" in out.stdout


def test_bad_override_exits_2_with_the_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  epochs: 1\n")
    assert main(["train", str(cfg), "optim.lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lerning_rate" in err and "optim.lr" in err


def test_plan_launch_table_end_to_end(tmp_path, tiny_tree, capsys):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    study = tmp_path / "st.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"method.name": ["dino", "dino_no_centering"]},
                                     "seeds": [0]}))
    assert main(["grid", "plan", str(study)]) == 0
    plan = capsys.readouterr().out
    assert "2 runs" in plan and plan.count("pending") == 2
    assert main(["results", "table", str(study)]) == 0
    assert capsys.readouterr().out.count("missing") >= 2
    assert main(["grid", "launch", str(study)]) == 0
    assert "2 completed" in capsys.readouterr().out
    out_md = tmp_path / "table.md"
    assert main(["results", "table", str(study), "--output", str(out_md)]) == 0
    table = capsys.readouterr().out
    assert "| dino " in table and "1/1" in table and "k-NN top-1" in table and "missing" not in table
    assert out_md.read_text() == table
    assert main(["grid", "launch", str(study)]) == 0
    assert "2 skipped" in capsys.readouterr().out
    png = tmp_path / "curves.png"
    assert main(["results", "curves", str(study), "--every", "1", "--plot", str(png)]) == 0
    curves = capsys.readouterr().out
    assert "collapse/teacher_entropy" in curves and "dino_no_centering" in curves and png.stat().st_size > 1000
    run_results_commands(tmp_path, study, capsys)


def run_results_commands(tmp_path, study, capsys):
    """collect (CSV, Parquet), table (tex, csv, reference), plot and compare on the runs just trained."""
    import pandas as pd

    runs_csv, runs_parquet = tmp_path / "runs.csv", tmp_path / "runs.parquet"
    assert main(["results", "collect", str(study), "--output", str(runs_csv)]) == 0
    assert main(["results", "collect", str(study), "--output", str(runs_parquet)]) == 0
    df, pq = pd.read_csv(runs_csv), pd.read_parquet(runs_parquet)
    assert list(df["status"]) == ["completed"] * 2 and list(pq["run_id"]) == list(df["run_id"])
    assert {"knn_top1", "git_sha", "hardware", "config.data.name", "timing.wall_s", "study"} <= set(df.columns)
    capsys.readouterr()
    assert main(["results", "table", str(study), "--cols", "knn_top1", "--format", "tex"]) == 0
    tex = capsys.readouterr().out
    assert r"\toprule" in tex and r"dino\_no\_centering" in tex and "% command: `ssl-bench" in tex
    ref = tmp_path / "ref.yaml"
    ref.write_text("title: t\nsource: s\nrows:\n  dino: {knn_top1: 50.0}\n")
    out_csv = tmp_path / "t.csv"
    assert main(["results", "table", str(study), "--cols", "knn_top1", "--reference", str(ref),
                 "--output", str(out_csv)]) == 0
    table = pd.read_csv(out_csv, comment="#")
    dino = table[table["method"] == "dino"].iloc[0]
    assert dino["delta"] == pytest.approx(df.loc[df["method"] == "dino", "knn_top1"].iloc[0] - 50.0)
    assert main(["results", "table", str(runs_parquet), "--cols", "knn_top1"]) == 0  # from a collected file
    assert "| dino " in capsys.readouterr().out
    assert main(["results", "plot", str(study), "--output-dir", str(tmp_path / "figs")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert "st_collapse.png" in pngs and all((tmp_path / "figs" / p).stat().st_size > 1000 for p in pngs)
    capsys.readouterr()
    assert main(["results", "compare", str(runs_csv), str(runs_parquet), "--cols", "knn_top1"]) == 0
    compare = capsys.readouterr().out
    assert "+0.00 (n=1)" in compare  # the same runs on both sides: paired differences are exactly 0
    assert main(["results", "table", str(study), "--cols", "knn_top9"]) == 2
    assert "knn_top9" in capsys.readouterr().err


# ---- this machine's devices and one step per epoch, checked before a local run (issue 16 item 1) -----


def _train_file(tmp_path, tiny_tree, **trainer):
    tree = {**tiny_tree, "trainer": {**tiny_tree["trainer"], **trainer}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_train_refuses_gpu_run_without_cuda(tmp_path, tiny_tree, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", str(_train_file(tmp_path, tiny_tree, accelerator="gpu"))]) == 2
    err = capsys.readouterr().err
    assert "trainer.accelerator='gpu' but torch finds no CUDA GPU" in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_train_refuses_more_gpus_than_present(tmp_path, tiny_tree, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["train", str(_train_file(tmp_path, tiny_tree, accelerator="cuda", devices=3))]) == 2
    assert "trainer.devices=3 but this machine has 2 CUDA GPU(s)" in capsys.readouterr().err


def test_train_refuses_more_cpu_processes_than_cores(tmp_path, tiny_tree, capsys, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    path = _train_file(tmp_path, tiny_tree, devices=3)
    assert main(["train", str(path), "data.subset=null"]) == 2
    assert "trainer.devices=3 but this machine has 2 CPU cores" in capsys.readouterr().err


def test_train_refuses_batch_larger_than_the_dataset(tmp_path, tiny_tree, capsys):
    path = _train_file(tmp_path, tiny_tree)
    assert main(["train", str(path), "data.subset=null", "data.batch_size=600"]) == 2  # synthetic: 512 images
    err = capsys.readouterr().err
    assert "data.name='synthetic' with 512 training images gives no training step per epoch" in err
    assert "a step needs 600 images" in err


def test_local_grid_checks_devices_but_a_profile_decides_on_slurm(tmp_path, tiny_tree, capsys, monkeypatch):
    import torch

    from ssl_bench.cli import grid as grid_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**tiny_tree, "trainer": {"accelerator": "gpu"}}))
    study = tmp_path / "st.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [0, 1]}}))
    assert main(["grid", "plan", str(study)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["grid", "launch", str(study)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr("ssl_bench.launch.slurm.validate_for_cluster", lambda *a: seen.append(a) or [])
    args = grid_cli.argparse.Namespace(study=str(study), overrides=[], cluster="submitit-local", profile=None)
    assert grid_cli._validate(grid_cli.load_study(args), args).name == "submitit-local"
    assert seen  # the profile's check ran instead of this machine's
