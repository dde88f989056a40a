"""CDC: what exactness costs. Payload bits of real streams (the exact integer hyper-synthesis,
64 scale levels, integer tables, symbol CRCs) over the float model's likelihood of its own
rounded latents (float hyper-synthesis, continuous scales).

    python -m benchmarks.cdc_exactness --checkpoint runs/cdc-hp128/gpu1/checkpoint

Needs the training checkpoint (the shipped weights keep only the integer hyper-synthesis).
Writes benchmarks/results/cdc_exactness.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model import load_codec
from model.cdc.model import CDCModel, gaussian_likelihood
from model.evaluation import load_images
from model.paths import DEV_PHOTOS

RESULTS = Path(__file__).parent / "results"


def float_bits(model: CDCModel, codec, img) -> float:
    with torch.no_grad():
        y = model.g_a(codec._to_padded_tensor(img)) * model.gains(torch.tensor([codec.rate]))[0]
        z = torch.round(model.h_a(y))
        position, mean = model.h_s(z)
        y_likelihood = gaussian_likelihood(torch.round(y - mean), model.scale_of(position))
        return float(-(torch.log2(model.z_likelihood(z)).sum() + torch.log2(y_likelihood).sum()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint folder of these weights")
    p.add_argument("--weights", default="cdc-hp128")
    p.add_argument("--images", default=str(DEV_PHOTOS / "*.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    images = load_images(args.images)
    rows = []
    for rate in load_codec(args.weights, device="cpu").rate_names:
        codec = load_codec(f"{args.weights}:{rate}", device="cpu")
        model = CDCModel(codec.config)
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.checkpoint / "model.safetensors")).items()})
        model.eval()
        coded = ideal = 0.0
        for img in images.values():
            data = codec.compress(img)
            coded += 8 * (len(data) - codec.read_header(data).size)
            ideal += float_bits(model, codec, img)
        rows.append({"rate": rate, "payload_over_float_likelihood": round(coded / ideal, 5)})
        print(f"{rate}  payload / float likelihood = {coded / ideal:.4f}", flush=True)
    result = {"weights": args.weights, "images": len(images), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cdc_exactness.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
