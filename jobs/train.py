"""Train a CDC codec with Ray Train and export it as a registry weights file.

    python -m jobs.train --name cdc-small-b0010 --beta 0.001 --steps 6000
    python -m jobs.train --name cdc-small-b0040 --beta 0.004 --steps 1500 \
        --init-from model/weights/cdc-small-b0010.safetensors          # fine-tune per rate
    python -m jobs.train --preset paper --workers 8 --gpu ...           # on a GPU cluster

Loss (Yang & Mandt 2023): beta * bpp + (1 - rho) * diffusion loss + rho * perceptual, where
the perceptual term is 1 - MS-SSIM (the paper's LPIPS needs VGG weights we cannot fetch).
Warm up at a low beta (high rate), then fine-tune from it at each higher beta.

State lives in --run-dir (default runs/<name>): checkpoint/ (model + optimizer as
safetensors, step and curve as JSON), rewritten atomically every --checkpoint-every steps.
Rerunning the same command resumes from the step it stopped at. At the end, rank 0
writes <export>.safetensors and <export>.curve.csv. The run dir must be shared storage
when workers sit on several machines.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from jobs._cli import setup_logging
from model.cdc.config import PRESETS, TrainConfig
from model.cdc.train import fit

log = logging.getLogger("jobs.train")

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="registry name, e.g. cdc-small-b0040")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--beta", type=float, required=True, help="rate weight (bits per pixel)")
    p.add_argument("--rho", type=float, default=DEFAULTS["rho"], help="weight of the 1 - MS-SSIM term")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps (resume continues to it)")
    p.add_argument("--max-minutes", type=float, default=DEFAULTS["max_minutes"],
                   help="stop (and checkpoint) after this long")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--crop", type=int, default=DEFAULTS["crop"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--aux-lr", type=float, default=DEFAULTS["aux_lr"], help="learning rate of the z-density quantiles")
    p.add_argument("--init-from", help="weights file to fine-tune from")
    p.add_argument("--data", default=DEFAULTS["data"])
    p.add_argument("--run-dir", help="checkpoint folder (default runs/<name>)")
    p.add_argument("--export", help="weights file to write (default model/weights/<name>.safetensors)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads per worker")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--log-every", type=int, default=DEFAULTS["log_every"])
    p.add_argument("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    config = TrainConfig(
        name=args.name, model=PRESETS[args.preset], beta=args.beta, rho=args.rho, steps=args.steps,
        max_minutes=args.max_minutes, batch_size=args.batch_size, crop=args.crop, lr=args.lr, aux_lr=args.aux_lr,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
        data=str(Path(args.data).resolve()), run_dir=str(Path(args.run_dir or Path("runs") / args.name).resolve()),
        seed=args.seed, threads=args.threads, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
        export=str(Path(args.export).resolve()) if args.export else None,
        provenance="python -m jobs.train " + shlex.join(argv))
    result = fit(config, workers=args.workers, gpu=args.gpu)
    log.info("finished: %s", result.metrics)


if __name__ == "__main__":
    main()
