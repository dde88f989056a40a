"""CDC maths: hyperprior entropy model with real rANS coding, X-parameterized diffusion, DDIM.

Yang & Mandt, "Lossy Image Compression with Conditional Diffusion Models" (NeurIPS 2023).
Images live in [-1, 1]. The diffusion time is continuous, t in [0, 1], with the cosine
schedule alpha_bar(t); the UNet predicts x0 directly, so a handful of DDIM steps suffice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional
from pytorch_msssim import ms_ssim
from torch import nn

from .config import CDCConfig
from .nets import (AnalysisTransform, ConditionalUNet, ConditioningDecoder, HyperAnalysis,
                       HyperSynthesis)

#: The image side must be a multiple of this: y is at 1/16, z at 1/64.
STRIDE = 64
# Scales of the Gaussian rANS tables; a scale is rounded up to the next entry. compressai's
# usual 64 entries (13% apart) cost ~3% over the likelihood-based rate; 256 cost ~0.5%.
SCALES = torch.exp(torch.linspace(math.log(0.11), math.log(256.0), 256))
_COSINE_OFFSET = 0.008
# pytorch_msssim downsamples 4 times whatever the number of scales: 7 px windows need > 96 px.
MIN_MSSSIM_SIDE = 96


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: signal fraction of x_t at time t (1 at t=0, 0 at t=1)."""
    f = torch.cos((t.double() + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    f0 = math.cos(_COSINE_OFFSET / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (f / f0).clamp(0.0, 1.0).float()


@dataclass
class EncodedLatents:
    z_symbols: torch.Tensor  # integer-valued, (1, Ch, H/64, W/64)
    y_symbols: torch.Tensor  # integer-valued, (1, Cy, H/16, W/16)
    z_string: bytes
    y_string: bytes
    estimated_bits: float  # -log2 likelihood of the quantized latents


class CDCModel(nn.Module):
    def __init__(self, config: CDCConfig):
        super().__init__()
        self.config = config
        cy, ch = config.latent_channels, config.hyper_channels
        self.analysis = AnalysisTransform(config.encoder_widths, cy)
        self.hyper_analysis = HyperAnalysis(cy, ch)
        self.hyper_synthesis = HyperSynthesis(cy, ch)
        self.entropy_bottleneck = EntropyBottleneck(ch)
        self.gaussian_conditional = GaussianConditional(None)
        self.conditioning = ConditioningDecoder(cy, config.context_widths)
        self.unet = ConditionalUNet(config.unet_widths, config.context_widths, config.attention)

    # ----- weights -------------------------------------------------------------------------
    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The learned parameters. Buffers are left out: compressai's are either constants of
        the code (likelihood bounds, aux targets) or tables derived from the parameters."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def load_weight_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        if missing or unexpected:
            raise ValueError(f"weights do not fit the CDC config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)

    def build_entropy_tables(self) -> None:
        """Quantized CDFs for rANS; must run after the weights are final.

        The z-density's quantiles (its median and 1e-9 tails) are found by bisection here
        rather than trusted from the aux loss, which converges far slower than training.
        """
        self.entropy_bottleneck.update(force=True, update_quantiles=True)
        self.gaussian_conditional.update_scale_table(SCALES, force=True)

    # ----- training ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, beta: float, rho: float) -> dict[str, torch.Tensor]:
        """Training losses: beta * bpp + (1 - rho) * diffusion MSE + rho * (1 - MS-SSIM of the x0 prediction).

        `aux` trains only the z-density's quantiles (compressai stops its gradient elsewhere).
        """
        b, _, h, w = x.shape
        y = self.analysis(x)
        z_tilde, z_likelihoods = self.entropy_bottleneck(self.hyper_analysis(y))
        scales, means = self.hyper_synthesis(z_tilde)
        _, y_likelihoods = self.gaussian_conditional(y, scales, means)
        bits = -(torch.log2(z_likelihoods).sum() + torch.log2(y_likelihoods).sum())
        bpp = bits / (b * h * w)
        # The decoder sees rounded latents (straight-through), as it will at test time.
        y_hat = means + (y - means + (torch.round(y - means) - (y - means)).detach())
        context = self.conditioning(y_hat)
        # t ~ density 2t (not uniform as in the paper): noisy inputs force the UNet to read
        # the conditioning, which is what few-step decoding relies on and what a short
        # CPU training otherwise learns last.
        t = torch.rand(b, device=x.device).sqrt()
        a = alpha_bar(t)[:, None, None, None]
        x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn_like(x)
        x0_pred = self.unet(x_t, t, context)
        mse = F.mse_loss(x0_pred, x)
        perceptual = x.new_zeros(())
        if rho > 0:
            if min(h, w) <= MIN_MSSSIM_SIDE:
                raise ValueError(f"the MS-SSIM term (rho > 0) needs crops larger than {MIN_MSSSIM_SIDE} px")
            perceptual = 1 - ms_ssim((x0_pred.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0,
                                     win_size=7, weights=[0.2, 0.3, 0.5])
        loss = beta * bpp + (1 - rho) * mse + rho * perceptual
        return {"loss": loss, "bpp": bpp.detach(), "mse": mse.detach(),
                "perceptual": perceptual.detach(), "aux": self.entropy_bottleneck.loss()}

    # ----- entropy coding (batch of one: the tables depend on these exact floats) ----------
    def encode_latents(self, y: torch.Tensor) -> EncodedLatents:
        z = self.hyper_analysis(y)
        medians = self._z_medians(z)
        z_symbols = torch.round(z - medians)
        z_string = self._code(self.entropy_bottleneck, z_symbols, self._z_indexes(z.shape))
        scales, means = self.hyper_synthesis(z_symbols + medians)
        y_symbols = torch.round(y - means)
        y_indexes = self.gaussian_conditional.build_indexes(scales)
        y_string = self._code(self.gaussian_conditional, y_symbols, y_indexes)
        _, z_lik = self.entropy_bottleneck(z)
        _, y_lik = self.gaussian_conditional(y, scales, means)
        bits = -(torch.log2(z_lik).sum() + torch.log2(y_lik).sum()).item()
        return EncodedLatents(z_symbols, y_symbols, z_string, y_string, bits)

    def decode_latents(self, z_string: bytes, y_string: bytes, z_shape: tuple[int, int, int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (z_symbols, y_symbols, y_hat)."""
        z_symbols = self._decode(self.entropy_bottleneck, z_string, self._z_indexes(z_shape))
        scales, means = self.hyper_synthesis(z_symbols + self._z_medians(z_symbols))
        y_indexes = self.gaussian_conditional.build_indexes(scales)
        y_symbols = self._decode(self.gaussian_conditional, y_string, y_indexes)
        return z_symbols, y_symbols, y_symbols + means

    def _z_medians(self, z: torch.Tensor) -> torch.Tensor:
        return self.entropy_bottleneck.quantiles[:, 0, 1].reshape(1, -1, 1, 1).to(z.dtype)

    def _z_indexes(self, shape: tuple[int, ...]) -> torch.Tensor:
        channels = torch.arange(shape[1], dtype=torch.int32, device=self.entropy_bottleneck.quantiles.device)
        return channels.reshape(1, -1, 1, 1).expand(1, shape[1], shape[2], shape[3])

    @staticmethod
    def _code(entropy_model: EntropyModel, symbols: torch.Tensor, indexes: torch.Tensor) -> bytes:
        return EntropyModel.compress(entropy_model, symbols, indexes)[0]

    @staticmethod
    def _decode(entropy_model: EntropyModel, string: bytes, indexes: torch.Tensor) -> torch.Tensor:
        # rANS reads at most one 32-bit word per symbol past its state; a zero tail keeps
        # a hostile string from reading outside its buffer (valid strings never reach it).
        tail = bytes(4 * indexes.numel() + 16)
        return EntropyModel.decompress(entropy_model, [string + tail], indexes.int())

    # ----- diffusion decoding ----------------------------------------------------------------
    def sample(self, context: list[torch.Tensor], noise: torch.Tensor, steps: int, eta: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM from t=1 (x_1 = noise) to t=0 in `steps` uniform steps; eta=0 is deterministic.

        With eta > 0, fresh noise is drawn from `generator` on the CPU, so the result does
        not depend on the device's random number generator.
        """
        x = noise
        times = torch.linspace(1.0, 0.0, steps + 1)
        x0 = x
        for t_now, t_next in zip(times[:-1], times[1:]):
            a_now, a_next = alpha_bar(t_now).item(), alpha_bar(t_next).item()
            x0 = self.unet(x, t_now.expand(x.shape[0]).to(x.device), context).clamp(-1, 1)
            if t_next == 0:
                break
            eps = (x - math.sqrt(a_now) * x0) / math.sqrt(1 - a_now)
            sigma = eta * math.sqrt((1 - a_next) / (1 - a_now) * (1 - a_now / a_next))
            x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        return x0
