"""CDC maths: a variable-rate mean-scale hyperprior content path and a conditional diffusion decoder.

Yang & Mandt, "Lossy Image Compression with Conditional Diffusion Models" (NeurIPS 2023),
with the content path shaped like Minnen et al.'s mean-scale hyperprior (2018) and one
network serving every rate through per-rate gain vectors on the latent (Cui et al.,
"Asymmetric Gained Deep Image Compression", 2021).

Images live in [-1, 1]. Rate r scales the latent, y' = y * g_enc[r]; the symbols are
k = round(y' - mean); the decoder sees (k + mean) * g_dec[r]. Each y element's Gaussian
scale is a position on a log-spaced table (`scale_position`): the exact integer
hyper-synthesis outputs that position and rounds it to a table entry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from torch import nn

from .config import CDCConfig
from .nets import ContentDecoder, ContentEncoder, DenoisingUNet, HyperDecoder, HyperEncoder

#: The image side must be a multiple of this: y is at 1/16, z at 1/64.
STRIDE = 64
_COSINE_OFFSET = 0.008
_LIKELIHOOD_BOUND = 1e-9


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: signal fraction of x_t at time t (1 at t=0, 0 at t=1), float64."""
    f = torch.cos((t.double() + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    f0 = math.cos(_COSINE_OFFSET / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (f / f0).clamp(0.0, 1.0)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def scale_of(config: CDCConfig, position: torch.Tensor) -> torch.Tensor:
    """Gaussian scale at a (continuous) position on the log-spaced scale table."""
    return torch.exp(math.log(config.scale_min) + config.scale_step * position.clamp(0, config.scale_levels - 1))


def z_likelihood(density: EntropyBottleneck, z: torch.Tensor) -> torch.Tensor:
    """Likelihood of every z element (B, N, h, w) under the factorized density."""
    values = z.permute(1, 0, 2, 3).reshape(z.shape[1], 1, -1)
    likelihood, _, _ = density._likelihood(values)
    likelihood = likelihood.clamp_min(_LIKELIHOOD_BOUND).reshape(z.shape[1], z.shape[0], *z.shape[2:])
    return likelihood.permute(1, 0, 2, 3)


def gaussian_likelihood(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P(integer bin around v) under N(0, scale), computed on the side where it does not cancel."""
    v = v.abs()
    upper = torch.special.ndtr((0.5 - v) / scale)
    lower = torch.special.ndtr((-0.5 - v) / scale)
    return (upper - lower).clamp_min(_LIKELIHOOD_BOUND)


class CDCModel(nn.Module):
    def __init__(self, config: CDCConfig):
        super().__init__()
        self.config = config
        n, m, rates = config.n, config.m, len(config.lambdas)
        self.g_a, self.g_s = ContentEncoder(n, m), ContentDecoder(n, m)
        self.h_a, self.h_s = HyperEncoder(n, m), HyperDecoder(n, m, config.hyper_hidden, config.hyper_kernel)
        self.z_density = EntropyBottleneck(n)
        # log-gains: positive gains, one vector per rate point (1 at initialization)
        self.log_gain_enc = nn.Parameter(torch.zeros(rates, m))
        self.log_gain_dec = nn.Parameter(torch.zeros(rates, m))
        self.unet = DenoisingUNet(list(config.unet_widths), [3, n, n, n])

    # ----- pieces shared by training and the codec ---------------------------------------
    def gains(self, rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder, decoder) gains of rate points, trained or derived (config.derived_rates)."""
        log_enc, log_dec = self.log_gain_enc, self.log_gain_dec
        derived = self.config.derived_rates
        if derived:
            sources = [self.config.rate_names.index(source) for _, source, _ in derived]
            shift = torch.tensor([[math.log(k)] for _, _, k in derived], dtype=log_enc.dtype, device=log_enc.device)
            log_enc = torch.cat([log_enc, log_enc[sources] + shift])
            log_dec = torch.cat([log_dec, log_dec[sources] - shift])
        return log_enc[rate].exp()[:, :, None, None], log_dec[rate].exp()[:, :, None, None]

    def scale_of(self, position: torch.Tensor) -> torch.Tensor:
        return scale_of(self.config, position)

    def z_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        return z_likelihood(self.z_density, z)

    def decode_content(self, y_hat: torch.Tensor, rate: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.g_s(y_hat * self.gains(rate)[1])

    # ----- training ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, rate: torch.Tensor, stage: str, diffusion_weight: float = 1.0
                ) -> dict[str, torch.Tensor]:
        """The training losses of one stage (see model.cdc.config.TrainConfig); DDP calls this."""
        if stage == "diffusion":
            with torch.no_grad():
                content = self.content_losses(x, rate)
            loss = self.diffusion_loss(x, content["x_mean"].float(), [f.detach() for f in content["features"]])
            return {"loss": loss, "bpp": content["bpp"].mean(), "mse01": content["mse01"].mean(),
                    "diffusion_mse": loss.detach()}
        content = self.content_losses(x, rate)
        out = {"loss": content["loss"], "bpp": content["bpp"].mean(), "mse01": content["mse01"].mean()}
        if stage == "joint":
            diffusion = self.diffusion_loss(x, content["x_mean"].float(), content["features"])
            out["diffusion_mse"] = diffusion.detach()
            # in the content loss's units: lambda * 255^2 * MSE on [0, 1] images, at the lowest rate's lambda
            out["loss"] = out["loss"] + diffusion_weight * min(self.config.lambdas) * 255.0 ** 2 / 4 * diffusion
        return out

    def content_losses(self, x: torch.Tensor, rate: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage 1: per-sample lambda * 255^2 * MSE(mean image) + bpp, noise for the rate, STE for the decoder."""
        b, _, h, w = x.shape
        gain_enc, _ = self.gains(rate)
        y = self.g_a(x).float() * gain_enc
        z = self.h_a(y).float()
        with torch.autocast(x.device.type, enabled=False):
            z_bits = -torch.log2(self.z_likelihood(z + torch.empty_like(z).uniform_(-0.5, 0.5)))
            position, mean = self.h_s(ste_round(z))
            scale = self.scale_of(position.float())
            noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            y_bits = -torch.log2(gaussian_likelihood(noisy - mean.float(), scale))
        y_hat = ste_round(y - mean) + mean
        x_mean, features = self.decode_content(y_hat, rate)
        bpp = (z_bits.sum((1, 2, 3)) + y_bits.sum((1, 2, 3))) / (h * w)
        mse01 = ((x_mean.float() - x) ** 2).mean((1, 2, 3)) / 4.0  # images in [0, 1], as the lambdas assume
        lam = torch.tensor(self.config.lambdas, device=x.device)[rate]
        loss = (lam * 255.0 ** 2 * mse01 + bpp).mean()
        return {"loss": loss, "bpp": bpp.detach(), "mse01": mse01.detach(), "x_mean": x_mean, "features": features}

    def diffusion_loss(self, x: torch.Tensor, x_mean: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Stage 2: X-parameterized denoising loss, t ~ U(0, 1), conditioned on the content decoder."""
        t = torch.rand(x.shape[0], device=x.device)
        a = alpha_bar(t).float()[:, None, None, None]
        x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn_like(x)
        x0 = self.unet(x_t, t, x_mean, features).float()
        return F.mse_loss(x0, x)

    # ----- decoding -----------------------------------------------------------------------
    def sample(self, x_mean: torch.Tensor, features: list[torch.Tensor], noise: torch.Tensor, steps: int,
               eta: float = 0.0, fresh_noise=None) -> torch.Tensor:
        """DDIM from t=1 (x_1 = noise) to t=0 in `steps` uniform steps; eta=0 is deterministic.

        `fresh_noise(shape)` supplies the noise of stochastic steps (eta > 0).
        """
        x = noise
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        x0 = x_mean
        for t_now, t_next in zip(times[:-1], times[1:]):
            a_now, a_next = alpha_bar(t_now).item(), alpha_bar(t_next).item()
            # one time row for the whole batch, broadcast: each image then runs the time MLPs exactly
            # as it would alone (a batch of B equal rows takes another matmul kernel, other rounding)
            x0 = self.unet(x, t_now.float().reshape(1).to(x.device), x_mean, features).clamp(-1, 1)
            if t_next == 0:
                break
            eps = (x - math.sqrt(a_now) * x0) / math.sqrt(1 - a_now)
            sigma = eta * math.sqrt((1 - a_next) / (1 - a_now) * (1 - a_now / a_next))
            x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * fresh_noise(x.shape).to(x.device)
        return x0
