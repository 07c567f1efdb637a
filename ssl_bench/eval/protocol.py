"""The registry of evaluation protocols: each registers its name, config section, run, arguments and printout once.

A protocol is one module of ``ssl_bench/eval/`` that calls :func:`register` at import;
:func:`protocols` imports every module of the package, so adding the file is all it takes.
``run/evaluate.py`` opens the target and writes the record, ``cli/eval.py`` builds ``ssl-bench eval
<name>`` from the registered arguments, and ``grid launch --eval`` accepts the chained ones.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from ssl_bench import config as config_lib
from ssl_bench.eval.features import FeatureCache
from ssl_bench.registry import Registry

ProgressFactory = Callable[[str], Optional[Callable[[int, int], None]]]  # label -> (done, total) callback


class MethodOutputs(NamedTuple):
    """A trained method's outputs on batches of its own training pipeline (runs only; wired in run/evaluate.py).

    targets: teacher probabilities of each global view, (N, K) each; student: student logits of every
    view, (N, K) each, globals first; teacher_cls: (N * globals, D) teacher backbone CLS of the globals.
    """

    targets: list[torch.Tensor]
    student: list[torch.Tensor]
    teacher_cls: torch.Tensor
    batches: int
    teacher_temp: float


@dataclass
class EvalContext:
    """What a protocol runs on: a frozen backbone on ``device``, the config of its evaluation, its caches."""

    cfg: config_lib.Config
    backbone: nn.Module  # a ``Backbone`` (``Features(cls, patches)``), already on ``device``
    device: torch.device
    weights: str  # sha256 of the backbone weights: the feature-cache key
    cache: FeatureCache  # under the record directory
    record_dir: Path
    backbone_name: str
    progress: ProgressFactory = lambda label: None
    log: Callable[[str], None] = print
    method_outputs: Optional[Callable[[int], MethodOutputs]] = None  # runs only: needs the method and its head

    @property
    def is_run(self) -> bool:
        return self.method_outputs is not None


@dataclass
class Outcome:
    """What a protocol returns; ``extra`` is stored in the record next to the metrics (JSON values)."""

    metrics: dict[str, Any]
    protocol: dict[str, Any]
    timing: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    record: Optional[Path] = None  # set by run/evaluate.py once written


@dataclass(frozen=True)
class Argument:
    """One command-line option of a protocol: ``argparse.add_argument(*flags, **options)``."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Argument:
    """``arg("--batches", type=int, default=4, help=...)``: the ``add_argument`` call, kept for later."""
    return Argument(flags, options)


@dataclass(frozen=True)
class Protocol:
    """One registered evaluation protocol.

    ``run(ctx, opts) -> Outcome`` and ``show(outcome, opts)`` receive the parsed ``arguments`` as
    ``opts`` (their defaults in chained jobs). ``section`` is the Config attribute holding its
    settings (None: it has none). ``inputs`` names the positional non-``key=value`` inputs it takes
    (``opts.inputs``); a protocol with inputs cannot be chained after training. ``sharded``: it
    splits its work over the ranks of a multi-task job (every rank must run it); any other protocol
    runs on rank 0 of such a job.
    """

    name: str
    help: str
    run: Callable[[EvalContext, SimpleNamespace], Outcome]
    show: Callable[[Outcome, SimpleNamespace], None]
    section: Optional[str] = None
    arguments: tuple[Argument, ...] = ()
    inputs: str = ""
    sharded: bool = False

    @property
    def chained(self) -> bool:
        """Whether it can follow training as a SLURM job (``grid launch --eval``): it needs no inputs."""
        return not self.inputs

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for a in self.arguments:
            parser.add_argument(*a.flags, **a.options)

    def defaults(self, **given: Any) -> SimpleNamespace:
        """The options a run without a command line uses: each argument's default, updated by ``given``."""
        parser = argparse.ArgumentParser(prog=self.name, add_help=False)
        self.add_arguments(parser)
        opts = vars(parser.parse_args([]))
        unknown = sorted(set(given) - set(opts) - {"inputs"})
        if unknown:
            raise TypeError(f"evaluation {self.name!r} has no option(s) {unknown}; valid: {sorted(opts)}")
        return SimpleNamespace(**{"inputs": [], **opts, **given})


PROTOCOLS: Registry[Protocol] = Registry("evaluation")


def register(protocol: Protocol) -> Protocol:
    """Add ``protocol`` under its name (once: a second registration of a name is an error)."""
    PROTOCOLS.add(protocol.name, protocol, protocol.help)
    return protocol


def protocols() -> Registry[Protocol]:
    """The registry with every protocol module of ``ssl_bench.eval`` imported (each registers itself)."""
    import ssl_bench.eval as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return PROTOCOLS


def chained_names() -> list[str]:
    """Protocols that ``grid launch --eval`` can chain after training."""
    return [e.name for e in protocols() if e.factory.chained]


def sharded_names() -> list[str]:
    """Protocols that split their work over the ranks of a multi-task job."""
    return [e.name for e in protocols() if e.factory.sharded]


def check_eval_size(ctx: EvalContext) -> None:
    """A ViT needs an eval crop that is a multiple of its patch size."""
    crop, patch = ctx.cfg.data.eval_crop_size, ctx.backbone.patch_size
    if patch and crop % patch:
        raise config_lib.ConfigError(f"data.eval_crop_size={crop} is not a multiple of the backbone's patch size "
                                     f"{patch}; choose e.g. {crop - crop % patch} or {crop - crop % patch + patch}")
