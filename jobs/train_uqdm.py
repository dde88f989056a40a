"""Fine-tune UQDM on the team's photos and export it as exact weights (one digest on every machine).

    diffpress train-uqdm --minutes 60                      # from the authors' uqdm-tiny, resumable
    diffpress train-uqdm --export-only                     # exact weights from the checkpoint, no training

The loss is the progressive negative ELBO as the exact codec codes it (model/uqdm/train.py):
the T universally quantized steps' rates plus the lossless pixel term, in bits per pixel, with the
noise schedule's slope trained too. Crops: random 64x64 of --data at native resolution. The
checkpoint folder (default ~/.cache/diffpress/runs/NAME) is rewritten atomically every
--checkpoint-every steps: rerunning the same command resumes it at the exact step. At the end
(or with --export-only) the EMA weights are calibrated on 16 training crops and quantized into
--out-dir (default ~/.cache/diffpress/weights, where load_codec finds them): NAME.safetensors
(the exact weights), NAME.float.safetensors + NAME.calibration.json (from which
`model.uqdm.train.remake_exact` makes the same exact weights on any machine) and NAME.curve.csv.
Nothing is written into the package: weights fine-tuned from the authors' uqdm-tiny derive from
weights we may not redistribute, so they are made by each user, never shipped.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from jobs import cli
from jobs._cli import UsageError, boolean, non_negative_float, positive_int, usage_errors
from model.paths import TRAIN_PHOTOS, UQDM_TINY_SOURCE
from model.registry import USER_DIR
from model.training import write_curve
from model.uqdm import train as uqdm_train

HELP = "fine-tune UQDM on photos (the codec's exact NELBO), export exact weights"
log = logging.getLogger("jobs.train_uqdm")
DEFAULTS = uqdm_train.UQDMTrainConfig(checkpoint="")


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--name", default="uqdm-tiny-photo", help="registry name of the exported weights (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder; rerunning resumes it "
                                                   "(default: ~/.cache/diffpress/runs/NAME)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="total optimizer steps (default: %(default)s)")
    p.add_argument("--minutes", type=non_negative_float, help="stop this run after so many minutes (checkpointed)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="crops per step (default: %(default)s)")
    p.add_argument("--lr", type=non_negative_float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=positive_int, default=d.warmup, help="warm-up steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--ema-decay", type=_fraction, default=d.ema_decay, help="EMA decay (default: %(default)s)")
    p.add_argument("--bf16", type=boolean, default=d.bf16, help="bf16 autocast of the network: true or false "
                                                                 "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of crops and noise (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=d.threads, help="torch threads (default: %(default)s)")
    p.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps per curve row (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                   help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--data", type=Path, default=TRAIN_PHOTOS, help="training photos (default: %(default)s)")
    p.add_argument("--init-from", type=Path, default=UQDM_TINY_SOURCE,
                   help="the authors' checkpoint folder or float UQDM weights (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=USER_DIR, help="where the exact weights, their float source, "
                                                                 "calibration record and curve go (default: %(default)s)")
    p.add_argument("--export-only", action="store_true", help="export the checkpoint's EMA weights, no training")
    p.add_argument("--no-export", action="store_true", help="train only")


def run(args: argparse.Namespace) -> int:
    if args.export_only and args.no_export:
        raise UsageError("--export-only and --no-export exclude each other")
    checkpoint = args.checkpoint or USER_DIR.parent / "runs" / args.name
    if not args.data.is_dir():
        raise UsageError(f"no training photos at {args.data}: give --data FOLDER (of images), or set DIFFPRESS_SHARED")
    command = "diffpress " + shlex.join(args.argv)
    if args.export_only:
        with usage_errors(FileNotFoundError):
            ema, state = uqdm_train.read_checkpoint(checkpoint)
    else:
        if not (args.init_from / "config.json").is_file() and not args.init_from.is_file():
            raise UsageError(f"--init-from {args.init_from}: neither the authors' checkpoint folder (config.json, "
                             "checkpoint.pt) nor a float UQDM weights file")
        cfg = uqdm_train.UQDMTrainConfig(
            checkpoint=str(checkpoint), steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
            lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
            bf16=args.bf16, seed=args.seed, threads=args.threads, log_every=args.log_every,
            checkpoint_every=args.checkpoint_every, data=str(args.data), init_from=str(args.init_from))
        with usage_errors(ValueError, FileNotFoundError):
            trainer = uqdm_train.Trainer(cfg)
        trainer.state.setdefault("commands", [])
        if command not in trainer.state["commands"][-1:]:
            trainer.state["commands"].append(command)
        trainer.run()
        if args.no_export:
            return 0
        ema, state = trainer.ema, trainer.state
    provenance = (f"fine-tuned from the authors' uqdm-tiny ({state['config']['init_from']}) on 64x64 crops of "
                  f"{state['config']['data']}, {state['step']} steps: {'; then '.join(state.get('commands', []))}; "
                  f"exported by: {command}")
    source = uqdm_train.float_source(ema, state["model_config"], args.name, provenance)
    weights_path = args.out_dir / f"{args.name}.safetensors"
    with usage_errors(FileExistsError, FileNotFoundError):
        exact = uqdm_train.export(source, args.name, args.out_dir / f"{args.name}.calibration.json",
                                  args.out_dir / f"{args.name}.float.safetensors", weights_path,
                                  uqdm_train.calibration_tiles(args.data))
    write_curve(state["curve"], weights_path.with_suffix(".curve.csv"), uqdm_train.CURVE_FIELDS)
    log.info("wrote %s (digest %s) after %d steps", weights_path, exact.digest.hex(), state["step"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train-uqdm", argv)


if __name__ == "__main__":
    sys.exit(main())
