"""The prepared script for a lent GPU: exactness across devices, speed, and a training run.

    python -m benchmarks.device_session prepare            # here (CPU): streams, expected pixels,
                                                           # a 256x256 archive, the wheels (.whl)
    bash benchmarks/device_session.sh                      # there (GPU), through the device tool
                                                           # (carry: [".gpu", ".whl"])
    python -m benchmarks.device_session collect DIR        # here: decode the GPU's streams on the CPU

`prepare` encodes test crops with every codec on this CPU and records the sha256 of every
decode (UQDM: each prefix; CDC: the symbols, 0 and 2 steps). `check` (on the GPU) decodes
those streams there and compares, encodes the same crops on the GPU and compares the
bytes, writes its own streams for `collect`, times encode and decode of a dev photo, the
batched synthesis of 768x512 latents (float32, bf16), and the loader with decode_on="device"
(4 CPU workers decoding latents, synthesis on the GPU) over the prepared 256x256 archive.
`train` runs the CDC stages for a time budget and saves the weights back.
Results: benchmarks/results/device_*.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from model import load_codec
from model.images import decode_image

log = logging.getLogger("benchmarks.device_session")
HERE = Path(__file__).resolve().parents[1]
STREAMS = HERE / ".gpu" / "streams"
ARCHIVE = HERE / ".gpu" / "archive"  # 256x256 crops compressed with cdc-hp128:q3, for the loader
WHEELS = HERE / ".whl"
# what the GPU machine lacks (it has torch and no network): wheels for its Python (3.12, KINDS.md),
# and compressai's sdist (built there)
GPU_WHEELS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              *(f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")),
              "constriction", "pytorch-msssim"]
SDISTS = ["--no-binary", ":all:", "compressai==1.2.8"]
ARCHIVE_CROPS, CROP, CROPS_PER_PHOTO = 1024, 256, 4
LOADER_BATCH, LOADER_WORKERS, LOADER_EPOCHS = 64, 4, 6
SYNTHESIS_BATCH = 8
PHOTO_BYTES = 40 << 20
WEIGHTS = HERE / ".gpu" / "weights"
CODECS = ("uqdm-tiny-exact2", "cdc-hp128:q3")


def _sha(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _crops() -> dict[str, np.ndarray]:
    """Two small crops of a sample photo that ships with matplotlib (any machine has it)."""
    import matplotlib.cbook
    img = decode_image(Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes())[0]
    return {"a": img[100:196, 150:278], "b": img[300:341, 200:263]}


def _decodes(codec, data: bytes) -> dict[str, str]:
    """sha256 of every decode a test looks at."""
    if codec.progressive:
        return {f"chunks{n}": _sha(codec.decompress(data, chunks=n)) for n in range(1, codec.n_chunks + 1)}
    z, k = codec.decode_symbols(data)
    return {"symbols": _sha(torch.cat([z.flatten(), k.flatten()]).cpu().numpy()),
            "steps0": _sha(codec.decompress(data, steps=0)), "steps2": _sha(codec.decompress(data, steps=2))}


def _pixels(codec, data: bytes) -> dict[str, np.ndarray]:
    if codec.progressive:
        return {"chunks5": codec.decompress(data)}
    return {"steps0": codec.decompress(data, steps=0), "steps2": codec.decompress(data, steps=2)}


def prepare() -> None:
    _prepare_weights_and_photos()
    STREAMS.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name in CODECS:
        codec = load_codec(name, device="cpu")
        for key, img in _crops().items():
            data = codec.compress(img)
            path = STREAMS / f"{name.replace(':', '_')}-{key}.bin"
            path.write_bytes(data)
            expected[path.name] = _decodes(codec, data)
            np.save(STREAMS / f"{path.stem}.npy", np.stack(list(_pixels(codec, data).values())))
    (STREAMS / "expected.json").write_text(json.dumps(expected, indent=1))
    print(json.dumps(expected, indent=1))
    shutil.rmtree(WHEELS, ignore_errors=True)  # one version of each, or the install there stops
    for spec in (GPU_WHEELS, SDISTS):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS), *spec], check=True)
    _prepare_archive()


def _prepare_weights_and_photos() -> None:
    """The imported UQDM weights in .gpu/weights; training photos up to PHOTO_BYTES (the tool
    carries 64 MiB in all) in .gpu/photos; one dev photo where _speed looks for it there."""
    from model.paths import DEV_PHOTOS, TRAIN_PHOTOS, UQDM_TINY_SOURCE
    from model.registry import save_weights
    from model.uqdm.importer import EXACT_NAME, import_exact
    weights = WEIGHTS / f"{EXACT_NAME}.safetensors"
    if not weights.exists():
        save_weights(import_exact(UQDM_TINY_SOURCE), weights)
    os.environ["DIFFPRESS_WEIGHTS"] = str(WEIGHTS)
    photos, used = HERE / ".gpu" / "photos", 0
    photos.mkdir(parents=True, exist_ok=True)
    for path in sorted(TRAIN_PHOTOS.iterdir()):
        if used + path.stat().st_size <= PHOTO_BYTES:
            shutil.copyfile(path, photos / path.name)
            used += path.stat().st_size
    dev = HERE / ".gpu" / "shared" / "data" / "photos" / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    first = sorted(DEV_PHOTOS.glob("*.png"))[0]
    shutil.copyfile(first, dev / first.name)


def _prepare_archive() -> None:
    """ARCHIVE_CROPS crops of CROP x CROP from the training photos (enough that a timed epoch of
    the loader is thousands of images a second's worth, not start-up) as a shard, compressed."""
    import tempfile

    import ray
    import webdataset

    from model.paths import TRAIN_PHOTOS
    from pipeline.compress import CompressConfig, run_compress
    crops = []
    for path in sorted(TRAIN_PHOTOS.iterdir()):
        if len(crops) >= ARCHIVE_CROPS:
            break
        photo = decode_image(path.read_bytes())[0]
        crops += [photo[top:top + CROP, left:left + CROP] for top in range(0, photo.shape[0] - CROP + 1, CROP)
                  for left in range(0, photo.shape[1] - CROP + 1, CROP)][:CROPS_PER_PHOTO]
    shutil.rmtree(ARCHIVE, ignore_errors=True)  # prepare may run again: a fresh archive each time
    with tempfile.TemporaryDirectory() as folder:
        with webdataset.TarWriter(f"{folder}/crops-000.tar", mtime=0) as writer:
            for number, crop in enumerate(crops[:ARCHIVE_CROPS]):
                writer.write({"__key__": f"{number:04d}", "png": crop})
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            run_compress(CompressConfig([f"{folder}/crops-000.tar"], str(ARCHIVE), "cdc-hp128:q3", actors=2))
        finally:
            ray.shutdown()


def check(out: Path) -> dict:
    """On the GPU: decode the CPU's streams, encode the same crops, time a dev-size photo."""
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "decode_cpu_streams": {}, "encode_equal_cpu": {}, "speed": {}}
    expected = json.loads((STREAMS / "expected.json").read_text())
    streams = {}
    for name in CODECS:
        codec = load_codec(name)
        for key, img in _crops().items():
            stem = f"{name.replace(':', '_')}-{key}"
            data = (STREAMS / f"{stem}.bin").read_bytes()
            got = _decodes(codec, data)
            cpu_pixels = np.load(STREAMS / f"{stem}.npy").astype(np.int16)
            gpu_pixels = np.stack(list(_pixels(codec, data).values())).astype(np.int16)
            report["decode_cpu_streams"][stem] = {
                "equal": {k: got[k] == v for k, v in expected[f"{stem}.bin"].items()},
                "max_pixel_difference": int(np.abs(cpu_pixels - gpu_pixels).max())}
            streams[f"{stem}.bin"] = gpu_data = codec.compress(img)
            report["encode_equal_cpu"][stem] = gpu_data == data
        np.savez(out / "gpu_streams.npz", **{k: np.frombuffer(v, np.uint8) for k, v in streams.items()})
        (out / "device_check.json").write_text(json.dumps(report, indent=1))  # kept if a later step is cut off
        report["speed"][name] = _speed(codec)
        (out / "device_check.json").write_text(json.dumps(report, indent=1))
    report["loader_decode_on_device"] = _loader_speed()
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    return report


def _speed(codec) -> dict:
    from model.paths import DEV_PHOTOS
    path = sorted(DEV_PHOTOS.glob("*.png"))[0] if DEV_PHOTOS.is_dir() else None
    img = decode_image(path.read_bytes())[0] if path else np.tile(_crops()["a"], (6, 6, 1))[:512, :768]
    megapixels = img.shape[0] * img.shape[1] / 1e6
    codec.compress(img[:64, :64])  # warm-up
    _sync()
    started = time.perf_counter()
    data = codec.compress(img)
    _sync()
    encode = time.perf_counter() - started
    timings = {"image": f"{img.shape[1]}x{img.shape[0]}", "encode_mp_s": megapixels / encode}
    options = [{"chunks": n} for n in (1, 5)] if codec.progressive else [{"steps": s} for s in (0, 4)]
    for option in options:
        started = time.perf_counter()
        codec.decompress(data, **option)
        _sync()
        timings["decode_mp_s_" + "_".join(f"{k}{v}" for k, v in option.items())] = megapixels / (time.perf_counter() - started)
    if not codec.progressive:
        timings.update(_batch_encode_speed(codec, img, megapixels))
        timings.update(_synthesis_speed(codec, data, megapixels))
    return timings


def _batch_encode_speed(codec, img: np.ndarray, megapixels: float) -> dict:
    """compress_batch of SYNTHESIS_BATCH copies (the analysis batched on the device; exact parts
    and entropy coding per image), and the share of it that the CPU's entropy coder takes: the
    coder holds the GIL (threads measured 0.92x on a CPU), so it bounds one actor's rate."""
    import model.cdc.codec as cdc_codec
    coder, coding = cdc_codec._symbols_chunk, [0.0]

    def timed_coder(*args, **kwargs):
        started = time.perf_counter()
        try:
            return coder(*args, **kwargs)
        finally:
            coding[0] += time.perf_counter() - started

    cdc_codec._symbols_chunk = timed_coder
    try:
        _sync()
        started = time.perf_counter()
        datas = codec.compress_batch([img] * SYNTHESIS_BATCH)
        _sync()
        seconds = time.perf_counter() - started
    finally:
        cdc_codec._symbols_chunk = coder
    return {f"encode_mp_s_batch{SYNTHESIS_BATCH}": SYNTHESIS_BATCH * megapixels / seconds,
            "encode_entropy_coding_share": coding[0] / seconds,
            "encode_batch_equal_single": all(d == datas[0] for d in datas)}


def _synthesis_speed(codec, data: bytes, megapixels: float) -> dict:
    """decode_latents (images/s, here) and synthesize of SYNTHESIS_BATCH latents a call (MP/s),
    float32 and bf16 + channels_last, and how far bf16's pixels are from float32's."""
    started = time.perf_counter()
    latents = codec.decode_latents([data] * SYNTHESIS_BATCH)
    out = {"decode_latents_images_s": SYNTHESIS_BATCH / (time.perf_counter() - started)}
    reference = None
    for name, options in (("float32", {}), ("bf16", {"autocast": torch.bfloat16, "channels_last": True})):
        codec.synthesize_tensors(latents, steps=0, **options)  # warm-up
        _sync()
        started = time.perf_counter()
        images = codec.synthesize_tensors(latents, steps=0, **options)
        _sync()
        out[f"synthesize_mp_s_{name}_batch{SYNTHESIS_BATCH}"] = SYNTHESIS_BATCH * megapixels / (time.perf_counter() - started)
        pixels = torch.stack(images).short()
        reference = pixels if reference is None else reference
        out[f"synthesize_{name}_levels_from_float32"] = int((pixels - reference).abs().max())
    return out


def _loader_speed() -> dict:
    """Images/s a training loop gets from ArchiveDataset(decode_on="device") over ARCHIVE: 4 CPU
    workers decode latents, each collating its own batches of LOADER_BATCH, the GPU synthesizes
    them (bf16); the first epoch warms up."""
    from torch.utils.data import DataLoader

    from pipeline.loader import ArchiveDataset, collate_samples
    dataset = ArchiveDataset(str(ARCHIVE), steps=0, decode_on="device", decode_batch=16)
    synthesize = dataset.synthesizer(autocast=torch.bfloat16, channels_last=True)
    loader = DataLoader(dataset, batch_size=LOADER_BATCH, num_workers=LOADER_WORKERS, collate_fn=collate_samples,
                        persistent_workers=True, multiprocessing_context="spawn")
    seconds, images = [], 0
    for epoch in range(LOADER_EPOCHS):
        dataset.set_epoch(epoch)
        started = time.perf_counter()
        for batch in loader:
            count = len(synthesize(batch))
            images += count if epoch else 0
        _sync()
        seconds.append(time.perf_counter() - started)
    return {"images_s": images / sum(seconds[1:]), "image": f"{CROP}x{CROP}", "workers": LOADER_WORKERS,
            "batch": LOADER_BATCH, "epoch_seconds": seconds, "device": str(synthesize.device)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train(out: Path, data: str, content_minutes: float, diffusion_minutes: float, batch: int,
          device: str = "cuda", init_from: str | None = "cdc-hp128") -> None:
    """CDC content stage, then diffusion stage, on the GPU; the final state dict back in three files.
    The content stage continues `init_from`'s networks (shipped weights: each lease adds to the
    last shipped model instead of starting over; None: from scratch)."""
    from model.cdc.config import TrainConfig
    from model.cdc.train import train as run_stage

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # training only
    out.mkdir(parents=True, exist_ok=True)
    common = dict(name="cdc-hp128", data=data, scales=(1.0,), batch_size=batch, device=device, threads=8,
                  log_every=100, checkpoint_every=10**9)
    content = TrainConfig(run_dir="/tmp/gpu-run/content", stage="content", minutes=content_minutes, lr=2e-4,
                          warmup=300, init_from=init_from, **common)
    model, curve = run_stage(content)
    _save_parts(model, out / "content")
    (out / "curve.json").write_text(json.dumps(curve))
    diffusion = TrainConfig(run_dir="/tmp/gpu-run/diffusion", stage="diffusion", minutes=diffusion_minutes, lr=2e-4,
                            warmup=200, init_from="/tmp/gpu-run/content/checkpoint", **common)
    model, curve = run_stage(diffusion)
    _save_parts(model, out / "final")  # the tool brings back 64 MiB: the content parts make way
    for part in out.glob("content-*.safetensors"):
        part.unlink()
    (out / "curve.json").write_text(json.dumps(curve))


def _save_parts(model, prefix: Path) -> None:
    """The state dict in three files (each under the tool's 16 MiB), float32."""
    from safetensors.torch import save_file
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    groups = {"a": ("g_a.", "h_a.", "log_gain"), "b": ("g_s.", "unet."), "c": ("h_s.", "z_density.")}
    for part, prefixes in groups.items():
        save_file({k: v for k, v in state.items() if k.startswith(prefixes)}, f"{prefix}-{part}.safetensors")


def collect(folder: Path) -> dict:
    """Here: decode the GPU's streams on this CPU and compare with the CPU's own decodes."""
    expected = json.loads((STREAMS / "expected.json").read_text())
    report = {}
    for key, array in np.load(folder / "gpu_streams.npz").items():
        codec = load_codec(key[:-len(".bin")].rsplit("-", 1)[0].replace("_", ":"), device="cpu")
        got = _decodes(codec, array.tobytes())
        report[key] = {k: got[k] == v for k, v in expected[key].items()}
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["prepare", "check", "train", "collect"])
    p.add_argument("folder", nargs="?", type=Path, help="check/train: where results go; collect: what came back")
    p.add_argument("--data", default=str(HERE / ".gpu" / "photos"))
    p.add_argument("--content-minutes", type=float, default=5.0)
    p.add_argument("--diffusion-minutes", type=float, default=1.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda", help="train: where (cpu for a dry run)")
    p.add_argument("--init-from", default="cdc-hp128",
                   help="train: shipped weights the content stage continues ('' : from scratch)")
    args = p.parse_args(argv)
    if args.action == "prepare":
        prepare()
    elif args.action == "check":
        args.folder.mkdir(parents=True, exist_ok=True)
        try:
            report = check(args.folder)
        except Exception:  # noqa: BLE001 - the training must still run; the trace comes back
            report = {"error": traceback.format_exc()}
        (args.folder / "device_check.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    elif args.action == "train":
        train(args.folder, args.data, args.content_minutes, args.diffusion_minutes, args.batch, args.device,
              args.init_from or None)
    else:
        print(json.dumps(collect(args.folder), indent=1))


if __name__ == "__main__":
    sys.exit(main())
