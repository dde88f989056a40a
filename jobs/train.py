"""Train CDC (one stage) and export it as a registry weights file; Ray Train or in-process.

    python -m jobs.train --name cdc-hp128 --stage content --steps 20000              # Ray Train, 1 worker
    python -m jobs.train --name cdc-hp128 --stage diffusion --steps 4000 \\
        --init-from runs/cdc-hp128/content/checkpoint --run-dir runs/cdc-hp128/diffusion
    python -m jobs.train ... --workers 8 --gpu --device cuda                         # a GPU cluster
    python -m jobs.train ... --in-process                                            # no Ray (one machine)

Every TrainConfig field is a flag (model/cdc/config.py says what each does). Stages:
content (rate + MSE of the content path, every rate point at once), diffusion (the
denoising UNet on the frozen content path), joint. State lives in --run-dir (default
runs/<name>/<stage>): rerunning the same command resumes at the exact step. At the end
the weights go to --export (default model/weights/<name>.safetensors) with their curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import typing
from dataclasses import fields
from pathlib import Path

from jobs._cli import setup_logging
from model.cdc.config import PRESETS, TrainConfig
from model.cdc.train import export, fit, train

log = logging.getLogger("jobs.train")
_PATHS = ("init_from", "data", "run_dir", "export")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in ("model", "rank", "world_size", "provenance"):
            continue
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"),
                           default=f.default)
        elif f.name == "scales":
            p.add_argument("--scales", type=float, nargs="+", default=list(f.default))
        else:
            convert = float if kind in (float, float | None) else int if kind is int else str
            default = None if f.default is dataclasses.MISSING else f.default
            p.add_argument(f"--{f.name.replace('_', '-')}", type=convert, default=default,
                           required=f.name == "name")
    p.add_argument("--preset", default="hp128", choices=sorted(PRESETS))
    p.add_argument("--lambdas", type=float, nargs="+", help="the rate points' MSE weights (default: the preset's)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--in-process", action="store_true", help="run the loop here, without Ray")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["run_dir"] = values.get("run_dir") or str(Path("runs") / args.name / args.stage)
    values.update({k: str(Path(values[k]).resolve()) for k in _PATHS if values.get(k)})
    values["scales"] = tuple(values["scales"])
    model = PRESETS[args.preset]
    if args.lambdas:
        model = dataclasses.replace(model, lambdas=tuple(args.lambdas))
    config = TrainConfig(**values, model=model, provenance="python -m jobs.train " + shlex.join(argv))
    if args.in_process:
        model, curve = train(config)
        export(model, curve, config)
    else:
        fit(config, workers=args.workers, gpu=args.gpu)


if __name__ == "__main__":
    main()
