"""Rate, distortion and realism of every codec on the dev photos, with jobs.evaluate's defaults.

    python -m benchmarks.rd     # -> benchmarks/results/evaluate/: results.json, results.md,
                                #    rd_psnr.png, rd_msssim.png, rd_swd.png; prints the tables

The same as `python -m jobs.evaluate --images '../shared/data/photos/dev/*.png' --out
benchmarks/results/evaluate` (which takes options). Needs the imported UQDM weights
(`python -m jobs.import_uqdm ../shared/weights/uqdm-tiny`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from model.evaluation import Settings, evaluate, load_images
from model.paths import DEV_PHOTOS
from model.report import markdown, write_report

RESULTS = Path(__file__).parent / "results" / "evaluate"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = evaluate(load_images(str(DEV_PHOTOS / "*.png")), Settings())
    report["command"] = "python -m benchmarks.rd"
    write_report(report, RESULTS)
    print(markdown(report))


if __name__ == "__main__":
    main()
