"""The ssl-bench command line, as a user types it."""

import subprocess
import sys

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
