"""Side-by-side benchmarks (bench/compare.py) and the generated JPEG set (bench/images.py); no timed assertions."""

from __future__ import annotations

import hashlib
import statistics

import pytest
import yaml
from PIL import Image

from ssl_bench import config as config_lib
from ssl_bench.bench import compare
from ssl_bench.bench.images import make_images, parse_size
from tests.conftest import TINY


def test_parse_compare_splits_values_outside_brackets():
    assert compare.parse_compare("data.multicrop=pil,tensor") == ("data.multicrop", ["pil", "tensor"])
    assert compare.parse_compare("data.local_crop_scale=[0.05,0.4],[0.1,0.4]") == (
        "data.local_crop_scale", ["[0.05,0.4]", "[0.1,0.4]"])
    for bad in ("data.multicrop", "data.multicrop=pil", "data.multicrop=pil,pil", "=a,b", "data.multicrop=pil,"):
        with pytest.raises(config_lib.ConfigError, match="--compare"):
            compare.parse_compare(bad)
    with pytest.raises(config_lib.ConfigError, match="remove the override 'data.multicrop=pil'"):
        compare.check_not_overridden("data.multicrop", ["data.batch_size=8", "data.multicrop=pil"])


def test_compare_data_interleaves_variants_and_ratios_are_the_medians_ratio(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config_lib.deep_merge(TINY, {"tracking": {"runs_root": str(tmp_path)}})))
    variants = compare.data_variants(str(path), [], "data.multicrop", ["pil", "tensor"])
    result = compare.compare_data(variants, [0], batches=2, warmup=1, repeats=3)
    order = [(r["repeat"], r["variant"]) for r in result["rows"]]
    assert order == [(i, v) for i in range(3) for v in ("data.multicrop=pil", "data.multicrop=tensor")]
    base, other = result["summary"]
    rates = {v: [r["images_per_s"] for r in result["rows"] if r["variant"] == v] for v in result["labels"]}
    assert base["ratio_to_baseline"] == pytest.approx(1.0)
    expected = statistics.median(rates["data.multicrop=tensor"]) / statistics.median(rates["data.multicrop=pil"])
    assert other["ratio_to_baseline"] == pytest.approx(expected)
    assert other["ratio_to_baseline_runs"] == pytest.approx(
        [a / b for a, b in zip(rates["data.multicrop=tensor"], rates["data.multicrop=pil"])])
    assert [v["config"]["multicrop"] for v in result["variants"]] == ["pil", "tensor"]
    assert "| 0 | data.multicrop=tensor |" in compare.format_data_table(result)


def test_compare_train_pairs_synthetic_and_real_runs_by_repeat():
    figures = iter([100.0, 90.0, 110.0, 88.0, 95.0, 99.0])  # synthetic, real, synthetic, real, ...
    calls = []

    def fake_run(cfg, steps, warmup, synthetic):
        calls.append(synthetic)
        rate = next(figures)
        return {"images_per_s": rate, "step_s_median": 1 / rate, "interval_s_median": 1 / rate,
                "peak_memory_mb": 10.0, "flops_per_image": 1.0, "achieved_tflops": None, "mfu": None}

    result = compare.compare_train(None, 3, 1, 3, fake_run)
    assert calls == [True, False] * 3
    assert result["summary"]["synthetic"]["images_per_s"] == 100.0  # median of 100, 110, 95
    assert result["summary"]["real"]["images_per_s"] == 90.0  # median of 90, 88, 99
    assert result["ratio_real_to_synthetic"] == pytest.approx(0.9)
    assert result["ratio_real_to_synthetic_runs"] == pytest.approx([0.9, 0.8, 99 / 95])
    assert "real / synthetic img/s: 0.900" in compare.format_train_table(result)


def test_make_images_is_deterministic_and_in_imagenet_layout(tmp_path):
    a = make_images(tmp_path / "a", count=6, size=(50, 30), classes=3, seed=1)
    make_images(tmp_path / "b", count=6, size=(50, 30), classes=3, seed=1)
    make_images(tmp_path / "c", count=6, size=(50, 30), classes=3, seed=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 6 + a["val_count"] and a["files"] == {"train": 6, "val": 3}
    assert {p.parts[0] for p in files} == {"train", "val"} and len({p.parts[1] for p in files}) == 3

    def digest(root):
        return [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in files]

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    with Image.open(tmp_path / "a" / files[0]) as image:
        assert image.size == (50, 30) and image.format == "JPEG" and image.mode == "RGB"
    assert parse_size("500x375") == (500, 375)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("500")
