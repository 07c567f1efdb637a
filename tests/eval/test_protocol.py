"""The evaluation registry: every protocol reaches ``ssl-bench eval``, the chained jobs and its config section."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ssl_bench import config as config_lib
from ssl_bench.cli import main
from ssl_bench.eval.protocol import Protocol, arg, chained_names, protocols

PROTOCOLS = protocols()


def test_the_four_protocols_are_registered_and_only_input_free_ones_chain():
    assert {"attention", "collapse", "knn", "linear"} <= set(PROTOCOLS.names())
    assert chained_names() == [n for n in PROTOCOLS.names() if not PROTOCOLS.get(n).inputs]
    assert "attention" not in chained_names()  # it needs image files


def test_every_protocol_has_an_eval_subcommand_with_its_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    for entry in PROTOCOLS:
        protocol = entry.factory
        assert any(line.split()[:1] == [protocol.name] and protocol.help.split()[0] in line
                   for line in listing.splitlines()), f"{protocol.name} missing from `ssl-bench eval --help`"
        with pytest.raises(SystemExit):
            main(["eval", protocol.name, "--help"])
        own = capsys.readouterr().out
        for argument in protocol.arguments:
            assert argument.flags[0] in own


def test_every_section_is_a_config_section_and_defaults_parse():
    sections = {f.name for f in dataclasses.fields(config_lib.Config)}
    for entry in PROTOCOLS:
        protocol = entry.factory
        assert protocol.section is None or protocol.section in sections, protocol.name
        assert protocol.defaults().inputs == []  # every option has a default a chained job can use
    assert PROTOCOLS.get("collapse").defaults(batches=2).batches == 2
    with pytest.raises(TypeError, match="no option.*'bogus'.*valid: \\['batches'\\]"):
        PROTOCOLS.get("collapse").defaults(bogus=1)


def test_a_protocol_is_registered_once():
    knn = PROTOCOLS.get("knn")
    with pytest.raises(ValueError, match="registered twice"):
        PROTOCOLS.add("knn", Protocol("knn", knn.help, knn.run, knn.show, arguments=(arg("--x"),)))


@pytest.mark.parametrize("names,message", [
    ("knn,nope", "unknown evaluation(s) ['nope']; valid: "),
    ("attention", "'attention' needs input files and cannot follow training; valid: ")])
def test_grid_launch_eval_refuses_a_name_the_registry_cannot_chain(tmp_path, tiny_tree, capsys, names, message):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    study = tmp_path / "st.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [0]}}))
    assert main(["grid", "launch", str(study), "--cluster", "debug", "--eval", names, "--dry-run"]) == 2
    assert message + ", ".join(chained_names()) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
