"""UQDM: progressive coding with a universally quantized diffusion model.

From "Progressive Compression with Universally Quantized Diffusion Models" (Yang, Will &
Mandt, ICLR 2025). The forward process adds uniform noise; each of the T reverse steps is
sent with universal quantization: with a dither u ~ U(-1/2, 1/2) shared through a seed,

    k = round((mu_q - mu_p) / delta + u),    z_s = mu_p + (k - u) * delta,

and k is entropy coded under the prior p(z_s | z_t) = logistic(mu_p, scale) * U(delta),
whose probability for k given u is exactly

    P(k | u) = sigmoid((k - u + 1/2) / r) - sigmoid((k - u - 1/2) / r),  r = scale / delta.

So the coded size equals the model's negative ELBO up to the coder's overhead. A final
lossless chunk codes the pixels under p(x | z_0). Stream = T + 1 chunks; any prefix
decodes: after n < T chunks the image is the network's denoised guess from z_{t_n}.

The released model works on 64x64 images with global attention, so images are cut into
64x64 tiles (edge-padded), processed `tile_batch` at a time to bound memory. Padding is
never coded: its symbols are fixed to k = 0 on both sides.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import entropy
from ..bitstream import BitstreamError
from ..codec import Codec
from ..images import as_rgb8
from ..registry import Weights
from .net import ScoreNet

TILE = 64
_PARAMS = struct.Struct(">HHI")  # tile size, tiles per batch, dither seed
_CRC = struct.Struct(">I")
_MAX_TILE_BATCH = 64  # bounds the work done before a hostile stream is caught


@dataclass(frozen=True)
class Step:
    """Schedule constants of one reverse step t -> s (float64, identical on every machine)."""
    alpha_t: float
    alpha_s: float
    sigma_t: float
    sigma_s: float
    expm1: float   # sigma_{t|s}^2 / sigma_t^2 = 1 - exp(gamma_s - gamma_t)
    delta: float   # width of the uniform noise = quantization step
    gamma_t: float


class UQDMCodec(Codec):
    family = "uqdm"
    progressive = True

    def __init__(self, weights: Weights, device: str | torch.device | None = None,
                 tile_batch: int | None = None, seed: int = 0):
        super().__init__(weights, device)
        cfg = weights.config
        self.net = ScoreNet(cfg)
        state = {k[len("net."):]: v for k, v in weights.tensors.items() if k.startswith("net.")}
        self.net.load_state_dict(state)
        self.net.eval().to(self.device)
        self.n_steps = cfg["n_timesteps"]
        slope, gamma_max = abs(float(weights.tensors["gamma_slope"])), cfg["gamma_max"]
        gammas = [gamma_max + slope * (t / self.n_steps - 1.0) for t in range(self.n_steps, -1, -1)]
        self.steps = [_step(g_t, g_s) for g_t, g_s in zip(gammas, gammas[1:])]
        self.gamma_0 = gammas[-1]
        self.alpha_0 = math.sqrt(_sigmoid(-self.gamma_0))
        self.tile_batch = tile_batch or (4 if self.device.type == "cpu" else 32)
        self.seed = seed

    @property
    def n_chunks(self) -> int:
        return self.n_steps + 1

    # ------------------------------------------------------------------ encode
    def compress_batch(self, imgs: Sequence[np.ndarray]) -> list[bytes]:
        return [self.compress_with_rates(img)[0] for img in imgs]

    def compress_with_rates(self, img: np.ndarray) -> tuple[bytes, list[float]]:
        """Encode one image; also return the model's ideal bits per chunk (its negative ELBO)."""
        img = as_rgb8(img)
        height, width = img.shape[:2]
        tiles = _tile(img)
        segments = [[] for _ in range(self.n_chunks)]
        ideal_bits = [0.0] * self.n_chunks
        with self.pinned_numerics():
            for first, last in _groups(len(tiles), self.tile_batch):
                x_raw = torch.from_numpy(tiles[first:last]).to(self.device)
                m = torch.from_numpy(_group_mask(height, width, first, last)).to(self.device)
                x = _to_unit(x_raw)
                z = self._initial_latent(first, last)
                for i, step in enumerate(self.steps):
                    p_loc, r = self._prior(z, step)
                    u = self._dither(first, last, i + 1)
                    q_loc = step.alpha_s * ((1 - step.expm1) / step.alpha_t * z + step.expm1 * x)
                    k = torch.round((q_loc - p_loc) / step.delta + u) * m
                    z = p_loc + (k - u) * step.delta
                    symbols, log_rows = k[m].long().cpu().numpy(), _uq_log_rows(u, r, m)
                    segment, bits = _encode_segment(symbols, log_rows, checked=symbols)
                    segments[i].append(segment)
                    ideal_bits[i] += bits
                centre, log_rows = self._pixel_model(z, m)
                pixels = x_raw[m].long().cpu().numpy()
                segment, bits = _encode_segment(pixels - centre, log_rows, checked=pixels)
                segments[-1].append(segment)
                ideal_bits[-1] += bits
        chunks = [entropy.join_segments(segs) for segs in segments]
        params = _PARAMS.pack(TILE, self.tile_batch, self.seed)
        return self.pack(height, width, chunks, params), ideal_bits

    # ------------------------------------------------------------------ decode
    def decompress_batch(self, datas: Sequence[bytes], steps: int | None = None,
                         chunks: int | None = None) -> list[np.ndarray]:
        """Decode streams. `chunks` is the prefix to use: 1..T diffusion steps, T+1 = lossless (default).

        A stream cut after the n-th chunk decodes with chunks <= n.
        """
        if steps is not None:
            raise ValueError("UQDM spends one diffusion step per chunk: choose the prefix with chunks=N "
                             f"(1..{self.n_steps} steps, {self.n_chunks} = lossless), not steps")
        return [self._decode(data, chunks) for data in datas]

    def _decode(self, data: bytes, n_chunks: int | None) -> np.ndarray:
        header, chunks = self.unpack(data, n_chunks)
        if len(header.chunk_lengths) != self.n_chunks:
            raise BitstreamError(f"UQDM stream has {len(header.chunk_lengths)} chunks; this model writes {self.n_chunks}")
        tile_batch, seed = _read_params(header.params)
        height, width = header.height, header.width
        rows, cols = _grid(height, width)
        groups = list(_groups(rows * cols, tile_batch))
        # Check every chunk's framing before any network runs or any image is allocated.
        segments = [entropy.split_segments(chunk, len(groups)) for chunk in chunks]
        out = np.zeros((rows * cols, 3, TILE, TILE), dtype=np.uint8)
        with self.pinned_numerics():
            for g, (first, last) in enumerate(groups):
                m = torch.from_numpy(_group_mask(height, width, first, last)).to(self.device)
                z = self._initial_latent(first, last, seed)
                for i, step in enumerate(self.steps[:len(chunks)]):
                    p_loc, r = self._prior(z, step)
                    u = self._dither(first, last, i + 1, seed)
                    symbols = _decode_segment(segments[i][g], _uq_log_rows(u, r, m), m, i, lambda s: s)
                    k = torch.zeros_like(z)
                    k[m] = torch.from_numpy(symbols).to(z)
                    z = p_loc + (k - u) * step.delta
                lossless = segments[-1][g] if len(chunks) == self.n_chunks else None
                out[first:last] = self._reconstruct(z, m, len(chunks), lossless).cpu().numpy()
        return _untile(out, height, width)

    def _reconstruct(self, z: torch.Tensor, m: torch.Tensor, n_chunks: int,
                     lossless: bytes | None) -> torch.Tensor:
        if n_chunks < self.n_steps:  # denoise: the network's guess of x from z_t
            step = self.steps[n_chunks]
            eps, _ = self.net(z, torch.tensor(step.gamma_t, device=self.device))
            x_hat = ((z - step.sigma_t * eps) / step.alpha_t).clamp(-1, 1)
            return _to_pixels(x_hat / self.alpha_0)
        if lossless is None:  # argmax of p(x | z_0)
            return _to_pixels(z / self.alpha_0)
        centre, log_rows = self._pixel_model(z, m)
        pixels = _decode_segment(lossless, log_rows, m, n_chunks - 1, lambda offsets: np.clip(centre + offsets, 0, 255))
        x = torch.zeros(m.shape, dtype=torch.uint8, device=self.device)
        x[m] = torch.from_numpy(pixels.astype(np.uint8)).to(self.device)
        return x

    # ------------------------------------------------------------------ model pieces
    def _prior(self, z: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Location of p(z_s | z_t) and its logistic scale in units of delta."""
        eps, scale_factor = self.net(z, torch.tensor(step.gamma_t, device=self.device))
        p_loc = step.alpha_s / step.alpha_t * (z - step.sigma_t * step.expm1 * eps)
        # Prior std = sigma_{t|s} * learned factor; a logistic of std s has scale s*sqrt(3)/pi.
        scale = step.sigma_t * math.sqrt(step.expm1) * scale_factor * (math.sqrt(3.0) / math.pi)
        return p_loc, scale / step.delta

    def _pixel_model(self, z_0: torch.Tensor, m: torch.Tensor):
        """p(x | z_0) as integer centres and log-probability rows over offsets (VDM's decoder)."""
        centre_f = ((z_0[m] / self.alpha_0 + 1.0) * 128.0 - 0.5).double().cpu().numpy()
        centre = np.clip(np.round(centre_f), 0, 255).astype(np.int64)
        precision = math.exp(-self.gamma_0) / 128.0 ** 2  # of the Gaussian, in pixel units

        def log_rows(window: int) -> np.ndarray:
            values = centre[:, None] + np.arange(-window, window + 1)[None, :]
            logits = -0.5 * precision * (values - centre_f[:, None]) ** 2
            logits = np.where((values >= 0) & (values <= 255), logits, -np.inf)
            return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)

        return centre, log_rows

    def _initial_latent(self, first: int, last: int, seed: int | None = None) -> torch.Tensor:
        return self._noise(first, last, 0, seed, torch.randn)

    def _dither(self, first: int, last: int, step: int, seed: int | None = None) -> torch.Tensor:
        return self._noise(first, last, step, seed, torch.rand) - 0.5

    def _noise(self, first: int, last: int, step: int, seed: int | None, draw) -> torch.Tensor:
        """Shared randomness: one CPU generator per (seed, tile, step), whatever the batching."""
        seed = self.seed if seed is None else seed
        out = torch.empty((last - first, 3, TILE, TILE))
        for j, tile in enumerate(range(first, last)):
            gen = torch.Generator().manual_seed(((seed * 1_000_003 + tile) * 64 + step) % (1 << 63))
            out[j] = draw((3, TILE, TILE), generator=gen)
        return out.to(self.device)


# ---------------------------------------------------------------------- helpers
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _step(gamma_t: float, gamma_s: float) -> Step:
    expm1 = -math.expm1(gamma_s - gamma_t)
    sigma_s = math.sqrt(_sigmoid(gamma_s))
    return Step(alpha_t=math.sqrt(_sigmoid(-gamma_t)), alpha_s=math.sqrt(_sigmoid(-gamma_s)),
                sigma_t=math.sqrt(_sigmoid(gamma_t)), sigma_s=sigma_s,
                expm1=expm1, delta=sigma_s * math.sqrt(12.0 * expm1), gamma_t=gamma_t)


def _uq_log_rows(u: torch.Tensor, r: torch.Tensor, m: torch.Tensor) -> entropy.ProbabilityRows:
    """log P(k | u) of universal quantization under a logistic prior of scale r (in steps)."""
    u_m = u[m].double().cpu().numpy()[:, None]
    r_m = r[m].double().cpu().numpy()[:, None]

    def log_rows(window: int) -> np.ndarray:
        a = np.arange(-window, window + 1)[None, :] - u_m
        upper, lower = (a + 0.5) / r_m, (a - 0.5) / r_m
        # log(sigmoid(hi) - sigmoid(lo)), taken on the side of the median where it does not cancel.
        hi, lo = np.where(a > 0, -lower, upper), np.where(a > 0, -upper, lower)
        log_hi, log_lo = -np.logaddexp(0.0, -hi), -np.logaddexp(0.0, -lo)
        return log_hi + np.log1p(-np.exp(log_lo - log_hi))

    return log_rows


def _exp(log_rows: entropy.ProbabilityRows) -> entropy.ProbabilityRows:
    return lambda window: np.exp(log_rows(window))


def _to_unit(x_raw: torch.Tensor) -> torch.Tensor:
    return 2.0 * ((x_raw.float() + 0.5) / 256.0) - 1.0


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 128.0 - 0.5).round().clamp(0, 255).to(torch.uint8)


def _groups(n_tiles: int, tile_batch: int):
    """Tiles are processed, and their symbols framed, in fixed groups of `tile_batch`."""
    for first in range(0, n_tiles, tile_batch):
        yield first, min(first + tile_batch, n_tiles)


def _encode_segment(offsets: np.ndarray, log_rows: entropy.ProbabilityRows,
                    checked: np.ndarray) -> tuple[bytes, float]:
    """A CRC of what the decoder must reproduce, then the entropy-coded offsets.

    Also returns -log2 P of the offsets under the exact model (the negative-ELBO terms),
    read from the same rows the coder used, so they are computed once.
    """
    used = {}

    def rows(window: int) -> np.ndarray:
        used["window"], used["log"] = window, log_rows(window)
        return np.exp(used["log"])

    segment = _CRC.pack(zlib.crc32(checked.astype("<i4").tobytes())) + entropy.encode_offsets(offsets, rows)
    if not offsets.size:
        return segment, 0.0
    picked = used["log"][np.arange(offsets.size), offsets + used["window"]]
    return segment, float(-picked.sum() / math.log(2.0))


def _decode_segment(segment: bytes, log_rows: entropy.ProbabilityRows, m: torch.Tensor, chunk: int,
                    finish) -> np.ndarray:
    """Decode one segment, turn offsets into the checked values with `finish`, verify the CRC."""
    if len(segment) < _CRC.size:
        raise BitstreamError("UQDM segment too short")
    values = finish(entropy.decode_offsets(segment[_CRC.size:], int(m.sum()), _exp(log_rows)))
    if zlib.crc32(values.astype("<i4").tobytes()) != _CRC.unpack_from(segment)[0]:
        raise BitstreamError(
            f"chunk {chunk} decoded to other values than were encoded: the stream is corrupt, or this "
            "machine computes the model differently from the encoder's (e.g. GPU vs CPU)")
    return values


def _read_params(params: bytes) -> tuple[int, int]:
    if len(params) != _PARAMS.size:
        raise BitstreamError("corrupt UQDM parameters")
    tile, tile_batch, seed = _PARAMS.unpack(params)
    if tile != TILE or not 0 < tile_batch <= _MAX_TILE_BATCH:
        raise BitstreamError(f"unsupported UQDM tiling (tile {tile}, batch {tile_batch})")
    return tile_batch, seed


def _grid(height: int, width: int) -> tuple[int, int]:
    return -(-height // TILE), -(-width // TILE)


def _tile(img: np.ndarray) -> np.ndarray:
    """HxWx3 -> (N, 3, 64, 64) edge-padded tiles in row-major order."""
    height, width, _ = img.shape
    rows, cols = _grid(height, width)
    padded = np.pad(img, ((0, rows * TILE - height), (0, cols * TILE - width), (0, 0)), mode="edge")
    tiles = padded.reshape(rows, TILE, cols, TILE, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, TILE, TILE)
    return np.ascontiguousarray(tiles)


def _group_mask(height: int, width: int, first: int, last: int) -> np.ndarray:
    """Which elements of tiles first..last-1 are real pixels (the rest is padding, never coded)."""
    cols = _grid(height, width)[1]
    mask = np.zeros((last - first, 3, TILE, TILE), dtype=bool)
    for j, tile in enumerate(range(first, last)):
        row, col = divmod(tile, cols)
        mask[j, :, :height - row * TILE, :width - col * TILE] = True
    return mask


def _untile(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = _grid(height, width)
    full = tiles.reshape(rows, cols, 3, TILE, TILE).transpose(0, 3, 1, 4, 2).reshape(rows * TILE, cols * TILE, 3)
    return np.ascontiguousarray(full[:height, :width])
