"""Linear probe: batched heads vs torch SGD, schedule, features, held-out selection, end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_bench import config as config_lib
from ssl_bench.backbones.timm_backbone import build_backbone
from ssl_bench.config import LinearConfig
from ssl_bench.eval import linear, linear_heads
from ssl_bench.eval.linear import frozen_features, held_out_split, linear_inputs, linear_probe
from ssl_bench.eval.linear_heads import (FeatureChoice, HeadSpec, LinearHeads, StackedSGD, evaluate_heads, head_grid,
                                         lr_factor, probe_heads, select_head, train_heads)
from tests.conftest import TINY

C1 = FeatureChoice(1, False)


def clusters(n, centers, generator, noise=1.0):
    labels = torch.arange(n) % len(centers)
    return centers[labels] + noise * torch.randn(n, centers.shape[1], generator=generator), labels


def sources(x, y, batch, generator=None):
    """Per-epoch batches of ({C1: features}, labels), shuffled when a generator is given."""
    def batches(epoch=0):
        perm = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
        for i in range(0, len(y), batch):
            yield {C1: x[perm[i:i + batch]]}, y[perm[i:i + batch]]
    return batches


def separable_problem(seed=2):
    g = torch.Generator().manual_seed(seed)
    centers = 8.0 * torch.randn(5, 16, generator=g)  # pairwise distances ~ 8 * sqrt(32) >> noise 1
    train, val, test = (clusters(n, centers, g) for n in (400, 100, 200))
    return g, train, val, test


def run_separable(test_labels_override=None):
    g, (xt, yt), (xv, yv), (xs, ys) = separable_problem()
    if test_labels_override is not None:
        ys = test_labels_override(ys)
    lin = LinearConfig(lrs=[1e-5, 1e-3, 1e-2, 0.1], epochs=5, batch_size=50)
    specs = head_grid(lin.lrs, [C1], lin.batch_size)
    return specs, probe_heads(specs, {C1: 16}, 5, sources(xt, yt, 50, g), lambda: sources(xv, yv, 100)(),
                              lambda: sources(xs, ys, 100)(), lin, n_steps=8)


def test_separable_clusters_best_head_near_perfect_and_tiny_lr_worse():
    specs, (chosen, grid, _) = run_separable()
    assert len(grid) == 4 and chosen["test_top1"] >= 98.0 and chosen["test_top5"] == 100.0
    tiny = next(h for h in grid if h["lr"] == 1e-5)
    assert tiny["scaled_lr"] == pytest.approx(1e-5 * 50 / 256)
    assert tiny["val_top1"] < chosen["val_top1"] - 20 and tiny["test_top1"] < chosen["test_top1"] - 20


def test_selection_ignores_test_labels():
    _, (chosen, grid, _) = run_separable()
    _, (chosen_garbage, grid_garbage, _) = run_separable(lambda y: (y + 1) % 5)  # every test label wrong
    assert chosen_garbage["name"] == chosen["name"]
    assert [h["val_top1"] for h in grid_garbage] == [h["val_top1"] for h in grid]
    assert chosen_garbage["test_top1"] == 0.0 < chosen["test_top1"]


def test_test_source_is_touched_only_after_selection(monkeypatch):
    events = []
    real_select = linear_heads.select_head
    monkeypatch.setattr(linear_heads, "select_head", lambda *a: events.append("select") or real_select(*a))

    def test_source():
        if "select" not in events:
            raise AssertionError("test data requested before the head was chosen")
        events.append("test")
        return iter([({C1: torch.randn(4, 16)}, torch.zeros(4, dtype=torch.long))])

    g, (xt, yt), (xv, yv), _ = separable_problem()
    lin = LinearConfig(lrs=[1e-3, 0.1], epochs=1, batch_size=50)
    specs = head_grid(lin.lrs, [C1], lin.batch_size)
    probe_heads(specs, {C1: 16}, 5, sources(xt, yt, 50, g), lambda: sources(xv, yv, 100)(), test_source, lin, 8)
    assert events == ["select", "test"]


def test_select_head_tie_breaks():
    a4, a1, n4, n1 = FeatureChoice(4, True), FeatureChoice(1, True), FeatureChoice(4, False), FeatureChoice(1, False)
    specs = [HeadSpec(0.1, 0.1, n1), HeadSpec(0.01, 0.01, a4), HeadSpec(0.01, 0.01, a1), HeadSpec(0.01, 0.01, n4)]
    assert select_head(specs, [10.0, 20.0, 30.0, 60.0]) == 3  # best val top-1 first
    assert select_head(specs[:2], [50.0, 50.0]) == 1  # tie: the smaller lr
    assert select_head(specs, [50.0, 50.0, 50.0, 50.0]) == 2  # then fewer blocks: a1 over a4 and n4
    assert select_head(specs, [50.0, 50.0, 40.0, 50.0]) == 3  # then no avgpool: n4 over a4
    assert select_head([HeadSpec(0.01, 0.01, n4), HeadSpec(0.01, 0.01, n1)], [70.0, 70.0]) == 1


def test_cosine_schedule_and_lr_scaling(monkeypatch):
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(50, 100) == pytest.approx(0.5)
    assert lr_factor(25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(99, 100) == pytest.approx((1 + math.cos(math.pi * 0.99)) / 2)
    specs = head_grid([0.1, 0.02], [C1], batch_size=64)
    assert [s.scaled_lr for s in specs] == pytest.approx([0.025, 0.005])
    heads = LinearHeads(specs, {C1: 3}, 2)
    opt = StackedSGD(heads)
    factors = []
    monkeypatch.setattr(opt, "step", factors.append)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    train_heads(heads, opt, sources(x, y, 2), epochs=2, n_steps=3)  # T = 6 steps, per step not per epoch
    assert factors == pytest.approx([(1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)])


def test_batched_heads_match_torch_sgd_per_head():
    g = torch.Generator().manual_seed(1)
    choices = [FeatureChoice(1, False), FeatureChoice(1, True)]
    dims = {choices[0]: 8, choices[1]: 12}
    # Interleaved choices so heads of one group are not contiguous in spec order.
    specs = [HeadSpec(lr, lr * 2, c) for lr in (0.05, 0.5, 2.0) for c in choices]
    heads = LinearHeads(specs, dims, 4, seed=3)
    init = [(w.detach().clone(), b.detach().clone()) for w, b in heads.per_head()]
    data = [({c: torch.randn(5, d, generator=g) for c, d in dims.items()}, torch.randint(0, 4, (5,), generator=g))
            for _ in range(3)]
    train_heads(heads, StackedSGD(heads, 0.9, 1e-2), lambda epoch: data, epochs=2, n_steps=3)
    logits = heads(data[0][0])
    top1 = evaluate_heads(heads, data).top1
    for i, (spec, (w0, b0), (w, b)) in enumerate(zip(specs, init, heads.per_head())):
        ref = torch.nn.Linear(w0.shape[1], 4)
        with torch.no_grad():
            ref.weight.copy_(w0), ref.bias.copy_(b0)
        opt = torch.optim.SGD(ref.parameters(), lr=spec.scaled_lr, momentum=0.9, weight_decay=1e-2)
        for t, (inputs, labels) in enumerate(data * 2):
            opt.param_groups[0]["lr"] = spec.scaled_lr * (1 + math.cos(math.pi * t / 6)) / 2
            opt.zero_grad()
            F.cross_entropy(ref(inputs[spec.choice]), labels).backward()
            opt.step()
        assert (ref.weight - w0).abs().max() > 1e-3  # the heads really moved
        torch.testing.assert_close(w.detach(), ref.weight.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(b.detach(), ref.bias.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(logits[:, i], ref(data[0][0][spec.choice]), atol=1e-5, rtol=1e-5)
        hits = sum((ref(x[spec.choice]).argmax(1) == y).sum().item() for x, y in data)
        assert top1[i].item() == pytest.approx(100.0 * hits / 15)


def test_held_out_split_disjoint_and_seeded():
    train, val = held_out_split(50, 0.1, seed=0)
    assert len(val) == 5 and sorted(train + val) == list(range(50))
    assert held_out_split(50, 0.1, seed=0) == (train, val) and held_out_split(50, 0.1, seed=1)[1] != val


def tiny_vit(depth=4, **kwargs):
    tree = config_lib.deep_merge(TINY, {"backbone": {"depth": depth, "drop_path_rate": 0.0,
                                                     "kwargs": {**TINY["backbone"]["kwargs"], **kwargs}}})
    return build_backbone(config_lib.build_config(tree).backbone).eval()


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}])
def test_feature_choices_against_hooked_blocks(kwargs):
    torch.manual_seed(0)
    bb = tiny_vit(**kwargs)
    images = torch.randn(3, 3, 16, 16)
    outputs = []  # every block's raw output from the ordinary forward, normed here independently
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o)) for blk in bb.model.blocks]
    with torch.no_grad():
        final_cls = bb(images).cls
        normed = [bb.model.norm(o) for o in outputs]
    for h in hooks:
        h.remove()
    feats = linear_inputs(frozen_features(bb, images, 4), [FeatureChoice(1, False), FeatureChoice(4, True)])
    one, four = feats[FeatureChoice(1, False)], feats[FeatureChoice(4, True)]
    assert one.shape == (3, 32) and four.shape == (3, 5 * 32)
    torch.testing.assert_close(one, final_cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(four[:, :128], torch.cat([n[:, 0] for n in normed], dim=1), atol=1e-6, rtol=0)
    patches = normed[-1][:, bb.num_prefix_tokens:]  # registers (prefix tokens after the CLS) are not patches
    assert patches.shape[1] == 16
    torch.testing.assert_close(four[:, 128:], patches.mean(dim=1), atol=1e-6, rtol=0)


def probe_cfg(tmp_path, **linear_kw):
    tree = config_lib.deep_merge(TINY, {"tracking": {"runs_root": str(tmp_path)}, "linear": {
        "epochs": 1, "batch_size": 32, "train_subset": 80, "test_subset": 24, **linear_kw}})
    return tree


@pytest.mark.parametrize("augment", [True, False])
def test_linear_probe_end_to_end_vit(tmp_path, monkeypatch, augment):
    events, lines = [], []
    real_select, real_test = linear_heads.select_head, linear.probe_test_set
    monkeypatch.setattr(linear_heads, "select_head", lambda *a: events.append("select") or real_select(*a))
    monkeypatch.setattr(linear, "probe_test_set", lambda cfg: events.append("test") or real_test(cfg))
    tree = config_lib.deep_merge(probe_cfg(tmp_path, augment=augment), {"backbone": {"depth": 4}})
    cfg = config_lib.build_config(tree)
    bb = build_backbone(cfg.backbone).train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    result = linear_probe(bb, cfg, progress=lines.append)
    assert events == ["select", "test"]
    assert bb.training and all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    assert len(result.grid) == 13 * 2 * 2 and len({h["name"] for h in result.grid}) == 52
    assert result.chosen["name"] in {h["name"] for h in result.grid}
    assert all(0 <= h["val_top1"] <= 100 and 0 <= h["test_top1"] <= 100 for h in result.grid)
    p = result.protocol
    assert (p["train_size"], p["val_size"], p["test_size"]) == (72, 8, 24)
    assert p["mode"] == ("augment" if augment else "fast") and p["schedule"] == "cosine"
    assert p["scaled_lrs"] == pytest.approx([lr * 32 / 256 for lr in config_lib.DINOV2_LINEAR_LRS])
    assert p["n_last_blocks"] == [1, 4] and p["avgpool"] == [False, True] and "test never" in p["selection"]
    assert sum("epoch 1/1" in line for line in lines) == 1


def test_linear_probe_resnet_grid_collapses(tmp_path):
    tree = probe_cfg(tmp_path, train_subset=40, test_subset=16, batch_size=16, lrs=[0.01, 0.1])
    tree["backbone"] = {"name": "resnet18", "cifar_stem": True}  # replaces TINY's ViT options
    cfg = config_lib.build_config(tree)
    result = linear_probe(build_backbone(cfg.backbone), cfg)
    assert [(h["n_last_blocks"], h["avgpool"]) for h in result.grid] == [(1, False), (1, False)]
    assert result.protocol["n_last_blocks"] == [1] and result.protocol["avgpool"] == [False]
    assert "CNN" in result.protocol["grid_note"]


def test_linear_train_transform_crops_flips_and_normalises():
    from PIL import Image

    from ssl_bench.config import DataConfig
    from ssl_bench.data import linear_train_transform

    tf = linear_train_transform(DataConfig(eval_crop_size=12), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    flat = tf(Image.new("RGB", (30, 20), (255, 0, 51)))  # a constant image: every crop/flip gives the same values
    assert flat.shape == (3, 12, 12)
    torch.testing.assert_close(flat[:, 0, 0], torch.tensor([1.0, -1.0, 0.2]))
    torch.manual_seed(0)
    ramp = Image.fromarray((torch.arange(30).repeat(30, 1) * 8).to(torch.uint8).numpy()).convert("RGB")
    outs = {tuple(tf(ramp)[0, 6].tolist()) for _ in range(10)}
    assert len(outs) > 5  # random crops (and flips) differ, unlike the eval transform


def test_bench_linear_reports_every_variant():
    from ssl_bench.bench.linear import bench_linear

    out = bench_linear(heads=3, n=64, dim=8, classes=3, epochs=1, batch=16)
    assert out["setup"]["steps_per_epoch"] == 4
    assert all(out[v]["best_s"] >= 0 for v in ("stacked", "one_pass", "separate"))


# ---- non-finite features and heads: an error with counts, never an accuracy -------------------------------

def nan_on_first_sample(backbone):
    """The backbone's final norm outputs NaN for the first image of every batch (all tokens, every block)."""
    def hook(module, args, out):
        out = out.clone()
        out[0] = math.nan
        return out
    return backbone.model.norm.register_forward_hook(hook)


# per-sample values: CLS of the last 4 blocks (4 x 32) + the mean patch token (32); a bad sample is all NaN
PER_SAMPLE = 4 * 32 + 32


@pytest.mark.parametrize("augment,what,bad,rows", [
    (True, "linear-probe train features (epoch 1)", 2, 64),  # shuffled, drop_last: 2 batches of 32 per epoch
    (False, "linear-probe train features", 3, 72)])  # extracted once: batches of 32, 32, 8
def test_linear_probe_refuses_a_backbone_that_outputs_nan(tmp_path, monkeypatch, augment, what, bad, rows):
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    events = []
    real_select = linear_heads.select_head
    monkeypatch.setattr(linear_heads, "select_head", lambda *a: events.append("select") or real_select(*a))
    cfg = config_lib.build_config(config_lib.deep_merge(probe_cfg(tmp_path, augment=augment, lrs=[0.01, 0.1]),
                                                        {"backbone": {"depth": 4}}))
    bb = build_backbone(cfg.backbone)
    nan_on_first_sample(bb)
    lines = []
    with pytest.raises(NonFiniteFeaturesError) as info:
        linear_probe(bb, cfg, progress=lines.append)
    assert str(info.value).startswith(f"{what}: {bad} of {rows} rows (samples) hold NaN or inf "
                                      f"({bad * PER_SAMPLE} NaN and 0 inf among {rows * PER_SAMPLE} values)")
    assert events == [] and not any("epoch 1/1" in line for line in lines)  # no epoch reported, nothing chosen


@pytest.mark.parametrize("poisoned,what,rows", [("val", "linear-probe val features", 8),
                                                 ("test", "linear-probe test features", 24)])
def test_linear_probe_refuses_nan_in_val_or_test_features(tmp_path, monkeypatch, poisoned, what, rows):
    """The backbone turns bad after training (val) or after selection (test): the pass still raises."""
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    cfg = config_lib.build_config(config_lib.deep_merge(probe_cfg(tmp_path, augment=False, lrs=[0.01, 0.1]),
                                                        {"backbone": {"depth": 4}}))
    bb = build_backbone(cfg.backbone)
    name = "train_heads" if poisoned == "val" else "select_head"
    real = getattr(linear_heads, name)
    monkeypatch.setattr(linear_heads, name, lambda *a, **k: (real(*a, **k), nan_on_first_sample(bb))[0])
    with pytest.raises(NonFiniteFeaturesError) as info:
        linear_probe(bb, cfg)
    assert (info.value.what, info.value.bad_rows, info.value.rows, info.value.nan) == (what, 1, rows, PER_SAMPLE)


def test_extract_all_and_backbone_batches_count_every_part():
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    torch.manual_seed(0)
    bb = tiny_vit()
    nan_on_first_sample(bb)
    loader = [(torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.long)) for _ in range(2)]
    choices = [FeatureChoice(1, False), FeatureChoice(4, True)]
    with pytest.raises(NonFiniteFeaturesError, match=rf"^linear-probe train features: 2 of 6 rows .*"
                                                     rf"\({2 * PER_SAMPLE} NaN and 0 inf among {6 * PER_SAMPLE}"):
        linear.extract_all(bb, loader, choices, "cpu")
    batches = linear.backbone_batches(bb, loader, choices, "cpu", "linear-probe val features")
    assert next(batches)[0][FeatureChoice(1, False)].shape == (3, 32)  # batches flow; the check comes at the end
    next(batches)
    with pytest.raises(NonFiniteFeaturesError, match="^linear-probe val features: 2 of 6 rows"):
        next(batches)


def test_a_head_with_nan_logits_scores_nan_and_is_never_chosen():
    specs = head_grid([0.01, 0.1, 1.0], [C1], 256)
    heads = LinearHeads(specs, {C1: 4}, 3)
    with torch.no_grad():
        heads.weights[0][1, 2, 0] = math.nan  # head 1: NaN logit for class 2 on every sample
    data = [({C1: torch.randn(5, 4)}, torch.tensor([2, 2, 2, 0, 1]))]
    scores = evaluate_heads(heads, data)
    assert math.isnan(scores.top1[1]) and math.isnan(scores.top5[1])
    assert not scores.top1[[0, 2]].isnan().any()  # the other heads are unaffected
    assert scores.nonfinite.tolist() == [[0, 0, 0], [5, 5, 0], [0, 0, 0]]
    err = scores.error(1, "logits")
    assert (err.bad_rows, err.rows, err.nan, err.inf, err.values) == (5, 5, 5, 0, 15)
    assert select_head(specs, [10.0, math.nan, 5.0]) == 0
    assert select_head(specs, [math.nan, math.nan, 5.0]) == 2
    assert select_head(specs, [0.0, math.nan, 0.0]) == 0  # a NaN never beats even 0%


def test_probe_heads_refuses_non_finite_logits_on_val_and_on_the_chosen_test_head():
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    g, (xt, yt), (xv, yv), (xs, ys) = separable_problem()
    lin = LinearConfig(lrs=[1e-3, 0.1], epochs=1, batch_size=50)
    specs = head_grid(lin.lrs, [C1], lin.batch_size)
    bad_val = xv.clone()
    bad_val[7, 3] = math.nan  # every head's logits on sample 7 are NaN: no head can be chosen
    with pytest.raises(NonFiniteFeaturesError, match=r"^linear-probe val logits: all 2 heads are non-finite; the "
                                                     r"least affected, blocks1_avgpool0_lr0.001: 1 of 100 rows "
                                                     r"\(samples\) hold NaN or inf \(5 NaN and 0 inf among 500"):
        probe_heads(specs, {C1: 16}, 5, sources(xt, yt, 50, g), lambda: sources(bad_val, yv, 100)(),
                    lambda: sources(xs, ys, 100)(), lin, n_steps=8)
    bad_test = xs.clone()
    bad_test[11, 0] = math.inf  # +-inf logits for every class of sample 11 (no weight is exactly 0)
    with pytest.raises(NonFiniteFeaturesError, match=r"^linear-probe test logits of the chosen head "
                                                     r"blocks1_avgpool0_lr0.1: 1 of 200 rows .*"
                                                     r"\(0 NaN and 5 inf among 1000 values\)"):
        probe_heads(specs, {C1: 16}, 5, sources(xt, yt, 50, g), lambda: sources(xv, yv, 100)(),
                    lambda: sources(bad_test, ys, 100)(), lin, n_steps=8)
