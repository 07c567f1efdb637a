"""``ssl-bench eval collapse``: teacher entropy and KL (DINO, Caron et al. 2021, Fig. 7), RankMe and feature std.

Runs (with head, center and student) are measured on ``--batches`` multi-crop batches of their own
training pipeline, with the code the training logs use (``collapse.diagnostics``); backbone-only
checkpoints have no head, so only RankMe and feature std (on the eval-preprocessed test split) are
measured and entropy/KL are recorded as unavailable.
"""

from __future__ import annotations

from types import SimpleNamespace

from ssl_bench.data import eval_loaders
from ssl_bench.eval.collapse import diagnostics, feature_std, rankme
from ssl_bench.eval.features import cached_features
from ssl_bench.eval.knn_protocol import feature_spec
from ssl_bench.eval.protocol import EvalContext, Outcome, Protocol, arg, check_eval_size, register


def _run(ctx: EvalContext, opts: SimpleNamespace) -> Outcome:
    return _of_run(ctx, opts.batches) if ctx.is_run else _of_backbone(ctx)


def _of_run(ctx: EvalContext, batches: int) -> Outcome:
    cfg = ctx.cfg
    out = ctx.method_outputs(batches)
    values = diagnostics(out.targets, out.student, out.teacher_cls, cfg.method.student_temp)
    protocol = {"batches": out.batches, "images": out.batches * cfg.data.batch_size,
                "views": f"{len(out.student)} crops per image from the run's training pipeline (seed {cfg.seed})",
                "teacher_temp": out.teacher_temp, "student_temp": cfg.method.student_temp,
                "mode": "eval (no drop path)", "targets": f"{cfg.method.name} teacher targets with the checkpoint's center",
                "rankme_features": "teacher CLS of the global crops",
                "follows": "DINO Fig. 7 (entropy, KL); RankMe (Garrido et al. 2023)"}
    return Outcome({key: round(v, 6) for key, v in values.items()}, protocol)


def _of_backbone(ctx: EvalContext) -> Outcome:
    check_eval_size(ctx)
    cfg = ctx.cfg
    _, test_loader = eval_loaders(cfg)
    features, _, _ = cached_features(ctx.backbone, test_loader, feature_spec(cfg, "test", cfg.eval.test_subset),
                                     ctx.cache, ctx.weights, ctx.device)
    metrics = {"teacher_entropy": None, "kl_teacher_student": None,
               "rankme": round(rankme(features), 6), "feature_std": round(feature_std(features), 6)}
    protocol = {"images": len(features), "data": f"{cfg.data.name} test, eval preprocessing "
                f"{cfg.data.eval_resize}/{cfg.data.eval_crop_size}", "rankme_features": "backbone CLS",
                "unavailable": "teacher entropy and KL need the DINO head, which a backbone-only checkpoint lacks",
                "follows": "RankMe (Garrido et al. 2023)"}
    return Outcome(metrics, protocol)


def _show(out: Outcome, opts: SimpleNamespace) -> None:
    for name, value in out.metrics.items():
        print(f"{name:<20} {'n/a' if value is None else f'{value:.4f}'}")
    if "unavailable" in out.protocol:
        print(f"note: {out.protocol['unavailable']}")
    print(f"record: {out.record}")


register(Protocol("collapse", "teacher entropy, KL, RankMe, feature std", _run, _show,
                  arguments=(arg("--batches", type=int, default=4, help="training batches to measure (runs only)"),)))
