"""``ssl-bench eval``: run directories and imported checkpoints through every protocol, with records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_bench import config as config_lib
from ssl_bench import tracking
from ssl_bench.run import evaluate
from ssl_bench.run import train
from ssl_bench.cli import main
from ssl_bench.report.collect import collect

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny DINO run with its final k-NN features cached (shared by the tests below)."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("evalruns")
    tree = config_lib.deep_merge(TINY, {"tracking": {"runs_root": str(root / "runs")},
                                        "eval": {"cache_features": True}})
    cfg = config_lib.build_config(tree)
    result = train.run(cfg)
    assert result.status == "completed"
    return cfg, result


def test_eval_knn_of_a_run_reuses_the_training_features_and_numbers(trained):
    cfg, result = trained
    before = json.loads((result.run_dir / "result.json").read_text())
    target = evaluate.open_target(str(result.run_dir))
    assert target.is_run and target.cfg.data.name == "synthetic"
    out = evaluate.evaluate(target, "knn", CPU)
    # The same weights, data and protocol: the cached features are used and the numbers agree.
    assert json.loads(out.record.read_text())["feature_cache_hits"] == 2
    for key in ("knn_top1", "knn_top5", "knn_k10_top1", "knn_k200_top1"):
        assert out.metrics[key] == pytest.approx(result.metrics[key], abs=1e-9)
    after = json.loads((result.run_dir / "result.json").read_text())
    assert after["metrics"] == before["metrics"] and after["protocol"] == before["protocol"]
    assert out.record.name in {f"{k}.json" for k in after["evals"]}


def test_eval_knn_with_another_protocol_does_not_touch_training_metrics(trained):
    cfg, result = trained
    target = evaluate.open_target(str(result.run_dir), ["eval.knn_k=[1,5]", "eval.knn_report_k=1"])
    out = evaluate.evaluate(target, "knn", CPU)
    assert set(out.metrics) == {"knn_top1", "knn_top5", "knn_k1_top1", "knn_k5_top1"}
    after = json.loads((result.run_dir / "result.json").read_text())
    assert after["metrics"]["knn_top1"] == result.metrics["knn_top1"]  # training record unchanged
    assert len([e for e in after["evals"].values() if e["kind"] == "knn"]) >= 2  # both evals kept


def test_eval_knn_without_cache_matches(trained):
    _, result = trained
    target = evaluate.open_target(str(result.run_dir / "checkpoints" / "last.ckpt"))
    assert target.is_run
    out = evaluate.evaluate(target, "knn", CPU, no_cache=True)
    assert json.loads(out.record.read_text())["feature_cache_hits"] == 0
    assert out.metrics["knn_top1"] == pytest.approx(result.metrics["knn_top1"], abs=1e-9)


def test_eval_collapse_of_a_run_measures_all_four(trained):
    _, result = trained
    out = evaluate.evaluate(evaluate.open_target(str(result.run_dir)), "collapse", CPU, batches=2)
    m = out.metrics
    k = 64  # TINY method.out_dim
    assert 0 < m["teacher_entropy"] <= torch.log(torch.tensor(float(k))).item() + 1e-6
    assert m["kl_teacher_student"] >= 0 and m["rankme"] >= 1 and m["feature_std"] > 0
    assert out.protocol["images"] == 2 * 8


def test_eval_attention_writes_pngs(trained, tmp_path):
    _, result = trained
    image = tmp_path / "img.png"
    Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy()).save(image)
    out = evaluate.evaluate(evaluate.open_target(str(result.run_dir)), "attention", CPU, inputs=[str(image)],
                            output=str(tmp_path / "att"))
    heads = 2  # TINY kwargs num_heads
    files = [Path(p) for p in out.extra["files"]]
    assert len([p for p in files if "-head" in p.name]) == heads
    assert all(p.stat().st_size > 0 for p in files)


def test_run_dir_errors_name_the_problem(trained, tmp_path):
    _, result = trained
    with pytest.raises(config_lib.ConfigError, match="backbone"):
        evaluate.open_target(str(result.run_dir), ["backbone.depth=2"])
    with pytest.raises(config_lib.ConfigError, match="no run directory or checkpoint"):
        evaluate.open_target(str(tmp_path / "nope"))
    target = evaluate.open_target(str(result.run_dir), ["data.eval_resize=18", "data.eval_crop_size=18"])
    with pytest.raises(config_lib.ConfigError, match="multiple of the backbone's patch size 4"):
        evaluate.evaluate(target, "knn", CPU)


def test_cli_eval_knn_prints_a_table(trained, capsys):
    _, result = trained
    assert main(["eval", "knn", str(result.run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "|   k |" in out and "top-1 (%)" in out and f"{result.metrics['knn_top1']:.2f}%" in out


def test_cli_eval_error_exit_code(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path / "missing")]) == 2
    assert "no run directory or checkpoint" in capsys.readouterr().err


def test_collect_shows_post_hoc_linear_metrics_without_overwriting(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    tracking.write_json(run / "result.json", {"status": "completed", "metrics": {"knn_top1": 50.0}})
    tracking.record_eval(run, "knn-aaaa", {"kind": "knn", "created": "2026-01-01T00:00:00",
                                           "metrics": {"knn_top1": 10.0}, "protocol": {"k": 1}})
    tracking.record_eval(run, "linear-bbbb", {"kind": "linear", "created": "2026-01-01T00:00:00",
                                              "metrics": {"linear_top1": 60.0}, "protocol": {"epochs": 1}})
    tracking.record_eval(run, "linear-cccc", {"kind": "linear", "created": "2026-01-02T00:00:00",
                                              "metrics": {"linear_top1": 70.0}, "protocol": {"epochs": 2}})
    df = collect([{"run_id": "r", "run_dir": run, "seed": 0, "axes": {}}])
    assert df.loc[0, "knn_top1"] == 50.0  # the training number stays
    assert df.loc[0, "linear_top1"] == 70.0  # the latest linear eval
    assert json.loads(df.loc[0, "protocol"])["linear"] == {"epochs": 2}
    assert sorted(p.name for p in (run / "evals").iterdir()) == ["knn-aaaa.json", "linear-bbbb.json",
                                                                 "linear-cccc.json"]


def test_imported_official_checkpoint_gives_the_runs_numbers(trained, tmp_path):
    """The run's teacher exported in DINO's released-backbone format, evaluated as an imported checkpoint."""
    from ssl_bench.backbones.checkpoints import export_official

    cfg, result = trained
    run_target = evaluate.open_target(str(result.run_dir))
    pth = export_official(run_target.backbone, tmp_path / "dino_tiny_pretrain.pth", "dino-backbone")
    same_data = ["data.eval_resize=16", "data.eval_crop_size=16", "eval.bank_subset=64", "eval.test_subset=32",
                 f"tracking.runs_root={tmp_path / 'runs'}", "backbone.kwargs.num_heads=2"]
    target = evaluate.open_target(str(pth), same_data, dataset="synthetic")
    assert not target.is_run and target.info.format == "dino-backbone"
    assert target.info.weights_sha256 == run_target.info.weights_sha256
    out = evaluate.evaluate(target, "knn", CPU)
    assert out.metrics["knn_top1"] == pytest.approx(result.metrics["knn_top1"], abs=1e-9)
    record_dir = tmp_path / "runs" / "imported" / f"dino_tiny_pretrain-{target.info.weights_sha256[:8]}"
    assert out.record.parent.parent == record_dir
    assert json.loads((record_dir / "result.json").read_text())["status"] == "imported"
    # Without the head, collapse eval measures what a backbone alone allows and says why not the rest.
    collapse = evaluate.evaluate(target, "collapse", CPU)
    assert collapse.metrics["teacher_entropy"] is None and collapse.metrics["rankme"] >= 1
    assert "DINO head" in collapse.protocol["unavailable"]


def test_imported_checkpoint_defaults_to_its_native_resolution(trained, tmp_path):
    from ssl_bench.backbones.checkpoints import export_official

    _, result = trained
    pth = export_official(evaluate.open_target(str(result.run_dir)).backbone, tmp_path / "b.pth", "dino-backbone")
    target = evaluate.open_target(str(pth), ["backbone.kwargs.num_heads=2"])
    # TINY's ViT has a 16 px position grid: DINO's resize 256 / crop 224 ratio at that size.
    assert (target.cfg.data.eval_crop_size, target.cfg.data.eval_resize) == (16, 18)
    with pytest.raises(config_lib.ConfigError, match="num_heads"):
        evaluate.open_target(str(pth))  # dim 32 < 64: the head count cannot be inferred


def test_online_knn_every_epoch_logs_curve_points(tiny_tree):
    tree = config_lib.deep_merge(tiny_tree, {"data": {"subset": 16}, "optim": {"epochs": 3},
                                             "trainer": {"max_steps": -1}, "eval": {"knn_every_n_epochs": 1}})
    cfg = config_lib.build_config(tree)
    plain = config_lib.build_config(config_lib.deep_merge(tree, {"eval": {"knn_every_n_epochs": 0}}))
    assert config_lib.run_id(cfg) == config_lib.run_id(plain)  # evaluation cadence is not part of the run id
    result = train.run(cfg)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    online = [(x["step"], x["knn/top1"]) for x in lines if "knn/top1" in x]
    # 16 images / batch 8 = 2 steps per epoch; after epochs 1 and 2, not after the last (the final eval).
    assert [s for s, _ in online] == [2, 4]
    assert all(0 <= v <= 100 for _, v in online)
    assert all({"knn/top5", "knn/k10_top1", "knn/k200_top1"} <= set(x) for x in lines if "knn/top1" in x)


def test_eval_linear_of_a_run_records_grid_and_choice(trained):
    _, result = trained
    target = evaluate.open_target(str(result.run_dir), ["linear.lrs=[0.001,0.1]", "linear.epochs=1",
                                                        "linear.augment=false", "linear.batch_size=16"])
    out = evaluate.evaluate(target, "linear", CPU)
    grid, chosen = out.extra["grid"], out.extra["chosen"]
    assert len(grid) == 4  # 2 lrs x avgpool on/off; TINY has depth 1, so n_last_blocks=4 is dropped
    best = max(grid, key=lambda h: h["val_top1"])
    assert chosen["val_top1"] == best["val_top1"]
    assert out.metrics["linear_top1"] == chosen["test_top1"]
    rec = json.loads((result.run_dir / "result.json").read_text())
    entry = rec["evals"][out.record.stem]
    assert entry["protocol"]["mode"] == "fast" and entry["chosen"] == chosen
    df = collect([{"run_id": result.run_id, "run_dir": result.run_dir, "seed": 0, "axes": {}}])
    assert df.loc[0, "linear_top1"] == out.metrics["linear_top1"]


def test_eval_of_a_run_with_a_truncated_last_ckpt_falls_back_to_previous(trained, tmp_path, capsys):
    import shutil

    _, result = trained
    run = tmp_path / "copy" / result.run_dir.name
    shutil.copytree(result.run_dir, run)  # the shared run stays intact
    last, previous = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "previous.ckpt"
    shutil.copyfile(last, previous)  # a complete earlier checkpoint, as save_checkpoint_atomically keeps
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    target = evaluate.open_target(str(run))
    out = capsys.readouterr().out
    assert out.count("falling back to checkpoints/previous.ckpt") == 1 and f"cannot read {last}" in out
    assert target.checkpoint == previous and target.info.path == previous
    metrics = evaluate.evaluate(target, "collapse", CPU, batches=1).metrics  # reads it with weights_only=True
    assert metrics["kl_teacher_student"] >= 0 and metrics["rankme"] >= 1
    with pytest.raises(config_lib.ConfigError, match="cannot read checkpoint"):
        evaluate.open_target(str(last))  # a checkpoint file named explicitly is not replaced


def test_eval_refuses_a_run_whose_result_json_is_corrupt(trained, tmp_path):
    import shutil

    _, result = trained
    run = tmp_path / result.run_dir.name
    shutil.copytree(result.run_dir, run)
    (run / "result.json").write_text('{"status": "completed", "metrics": {"kn')
    with pytest.raises(config_lib.ConfigError, match=r"result\.json is corrupt \(not JSON: .*move it away"):
        evaluate.open_target(str(run))
    assert (run / "result.json").read_text().endswith('"kn')
