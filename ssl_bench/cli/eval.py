"""``ssl-bench eval <protocol>``: evaluate a run directory or an imported checkpoint; one subcommand per registered protocol."""

from __future__ import annotations

import argparse

from ssl_bench import config as config_lib


def open_eval_target(args: argparse.Namespace, overrides: list[str]):
    from ssl_bench.run import evaluate

    target = evaluate.open_target(args.target, overrides, dataset=args.dataset, key=args.key)
    kind = "run" if target.is_run else f"imported {target.info.format} checkpoint"
    print(f"[ssl-bench] {kind}: {target.info.path} ({target.info.backbone.name}, weights sha256 "
          f"{target.info.weights_sha256[:12]}); data {target.cfg.data.name}, eval preprocessing resize "
          f"{target.cfg.data.eval_resize} / crop {target.cfg.data.eval_crop_size}", flush=True)
    return target, evaluate.device_of(args.device)


def cmd_eval(args: argparse.Namespace) -> int:
    """Any protocol: split the positionals into key=value overrides and its inputs, run, record, print."""
    from ssl_bench import dist
    from ssl_bench.run import evaluate

    protocol = args.protocol
    overrides = [a for a in args.inputs if "=" in a or not protocol.inputs]  # without inputs: all are overrides
    inputs = [a for a in args.inputs if a not in overrides]
    if protocol.inputs and not inputs:
        raise config_lib.ConfigError(f"eval {protocol.name}: name at least one input ({protocol.inputs})")
    target, device = open_eval_target(args, overrides)
    opts = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func", "protocol")})
    opts.inputs = inputs
    with dist.launched_group("torchrun", device) as device:  # `torchrun --nproc-per-node N -m ssl_bench.cli eval`
        out = evaluate.run_protocol(target, protocol, device, opts)
        if dist.rank() == 0:  # the other ranks helped compute it; rank 0 recorded it
            protocol.show(out, opts)
    return 0


class EvalParser(argparse.ArgumentParser):
    """The ``eval`` group; its subcommands, one per registered protocol, are added when it is first parsed.

    Listing the protocols imports every one of them and with them timm and torchvision (seconds on
    a busy machine), which ``ssl-bench results``, ``grid status`` and the rest do not need.
    """

    def parse_known_args(self, args=None, namespace=None):
        if not self._subparsers:
            add_protocol_parsers(self)
        return super().parse_known_args(args, namespace)


def add_eval_parser(sub) -> None:
    text = "evaluate a run directory or a checkpoint (ssl-bench, DINO, DINOv2)"
    listed = sub.add_parser("eval", help=text)
    # argparse has no per-subcommand parser class: put the lazy parser where the listed one was.
    sub.choices["eval"] = EvalParser(prog=listed.prog, description=text)


def add_protocol_parsers(ev: argparse.ArgumentParser) -> None:
    from ssl_bench.eval.protocol import protocols

    ev_sub = ev.add_subparsers(dest="eval_command", required=True, parser_class=argparse.ArgumentParser)
    for entry in protocols():
        protocol = entry.factory
        p = ev_sub.add_parser(protocol.name, help=protocol.help)
        p.add_argument("target", help="run directory, its checkpoints/last.ckpt, or an official DINO/DINOv2 "
                                      "checkpoint (.pth)")
        example = f"e.g. {protocol.section}.KEY=VALUE" if protocol.section else "e.g. data.eval_crop_size=224"
        if protocol.inputs:
            p.add_argument("inputs", nargs="+", help=f"{protocol.inputs}, then optional key=value overrides")
        else:
            p.add_argument("inputs", nargs="*", metavar="overrides", help=f"key=value overrides, {example}")
        p.add_argument("--dataset", help="dataset to evaluate on (default: the run's, or fashion_mnist)")
        p.add_argument("--key", default="teacher", help="which network of a training checkpoint (teacher|student)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        protocol.add_arguments(p)
        p.set_defaults(func=cmd_eval, protocol=protocol)
