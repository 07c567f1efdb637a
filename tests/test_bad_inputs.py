"""Every malformed input in tests/bad_inputs/ is refused through the real CLI before any run starts.

Each case file starts with ``# expect: <fragment>`` line(s), a ``# command: train|grid plan|grid launch``
line and optionally ``# args: key=value ...``; files named ``_*`` are helpers the cases extend.
The CLI must exit 2 with the fragment in one ``ssl-bench: error:`` line, print no traceback, and
leave nothing new on disk (DESIGN.md habit 13).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_bench.cli import main

CASES_DIR = Path(__file__).parent / "bad_inputs"
CASES = sorted(p for p in CASES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def read_case(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(expected fragments, command words, extra args) from the file's header comments."""
    expect, command, args = [], [], []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        value = value.strip()
        if key == "expect":
            expect.append(value)
        elif key == "command":
            command = value.split()
        elif key == "args":
            args = value.split()
    assert expect and command, f"{path.name}: needs '# expect:' and '# command:' header lines"
    return expect, command, args


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """tmp_path/work holds a copy of the cases and is the cwd, so runs_root 'runs' lies inside it."""
    work = tmp_path / "work"
    shutil.copytree(CASES_DIR, work / "inputs")
    monkeypatch.chdir(work)
    return work


def test_corpus_has_enough_cases():
    assert len(CASES) >= 40  # issue 16: at least 40 malformed inputs, one file each
    for path in CASES:
        read_case(path)


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_bad_input_is_refused_before_any_run(case, workdir, capsys):
    expect, command, args = read_case(case)
    before = snapshot(workdir.parent)
    code = main([*command, str(Path("inputs") / case.name), *args])
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    for fragment in expect:
        assert fragment in err, f"{fragment!r} not in stderr: {err}"
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("ssl-bench: error:")]
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    assert snapshot(workdir.parent) == before  # no runs/ (nor anything else) was created
    assert not Path("/tmp/ssl_bench_escape_abs").exists()


@pytest.mark.parametrize("name", ["study_empty.yaml", "config_dup_key_nested.yaml"])
def test_console_script_prints_one_line(name, workdir):
    """The installed ``ssl-bench`` entry point (a fresh process) gives the same one-line error."""
    expect, command, args = read_case(CASES_DIR / name)
    exe = Path(sys.executable).with_name("ssl-bench")
    proc = subprocess.run([str(exe), *command, str(Path("inputs") / name), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert all(f in proc.stderr for f in expect) and "Traceback" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("text,fragment", [
    ('run_id,status\n"x,completed\n', "cannot be read as a `ssl-bench results collect` table: Error tokenizing"),
    ("", "cannot be read as a `ssl-bench results collect` table: No columns to parse"),
    ("a,b\n1,2\n", "is not a `ssl-bench results collect` table (no run_id/status)"),
])
def test_malformed_collected_csv_is_one_line_error(text, fragment, workdir, capsys):
    (workdir / "runs.csv").write_text(text)
    assert main(["results", "table", "runs.csv"]) == 2
    out, err = capsys.readouterr()
    assert fragment in err and "Traceback" not in out + err and len(err.strip().splitlines()) == 1
