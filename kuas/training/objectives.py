"""Training objectives: the denoising loss (eps or v, min-SNR weighting) and the autoencoder loss.

Per-sample randomness (timestep, noise, caption dropout) is drawn from generators seeded per sample
(see `kuas.training.loop.sample_seed`), so the loss of a sample does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_noise(seeds: list[int], shape: tuple[int, ...], num_timesteps: int,
                     t_probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For each seed: an integer timestep in [0, num_timesteps) and a standard normal tensor of `shape`.

    Timesteps are uniform, or drawn with probabilities `t_probs` (length num_timesteps) by inverting their
    cumulative distribution at one uniform number per seed.
    """
    cdf = None
    if t_probs is not None:
        cdf = torch.cumsum(t_probs.double().cpu() / t_probs.double().sum(), 0)
    ts, noises = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        if cdf is None:
            ts.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
        else:
            u = torch.rand(1, generator=g, dtype=torch.float64)
            ts.append(min(int(torch.searchsorted(cdf, u)), num_timesteps - 1))
        noises.append(torch.randn(shape, generator=g))
    return torch.tensor(ts), torch.stack(noises)


def randn_per_sample(seeds: list[int], shape: tuple[int, ...], salt: int = 0) -> Tensor:
    """One standard normal tensor of `shape` per seed (stacked), independent of the batch split."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s ^ salt)) for s in seeds])


def dropout_mask(seeds: list[int], p: float) -> list[bool]:
    """True where a sample's caption is dropped (classifier-free guidance training)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s ^ 0x5DEECE66D)
        out.append(bool(torch.rand(1, generator=g).item() < p))
    return out


@dataclass
class DenoisingObjective:
    """The latent diffusion loss of Stable Diffusion, in the discrete-time DDPM form.

    `prediction` is "eps" (predict the noise, SD 1.x / 2-base) or "v" (predict
    v = sqrt(a) * noise - sqrt(1 - a) * x0, SD 2.x 768). `min_snr_gamma` weights each timestep by
    min(SNR + snr_offset, gamma) / SNR (eps) or / (SNR + 1) (v), Hang et al. 2023 "Efficient Diffusion
    Training via Min-SNR Weighting Strategy"; None gives the plain mean squared error.

    In terms of the error of the predicted clean latent, min-SNR weights a timestep by min(SNR, gamma):
    almost nothing at high noise (SNR 0.04 at t = 800 of SD's schedule), where the layout of a picture
    (where objects go, how many there are) is decided. `snr_offset=1` with v-prediction weights the
    clean-latent error by min(SNR + 1, gamma) instead: the plain v loss (weight 1) at high and middle
    noise, min-SNR's cap at low noise.

    `timestep_importance` (0 to 1) draws timesteps from a mixture: that share with probability proportional
    to their weight, the rest uniformly, and divides each sample's weight by its timestep's probability
    relative to uniform: the same expected loss as uniform timesteps, with the batch moved toward the
    timesteps that weigh most. At 1 (pure importance sampling) every sample weighs the mean weight; with
    SD's schedule, v-prediction and gamma 5 the weights average 0.29 and a uniform batch of n samples is
    worth about 0.56 n of those ((E w)^2 / E w^2). Less variance overall, but high-noise timesteps (where
    the layout is decided) get few samples: positions were learned far later at 1 (builtin12).

    `input_perturbation` (gamma, Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models"; diffusers' `--input_perturbation`) noises the model's input with eps + gamma * xi (xi a
    second standard normal draw per sample) while the target keeps eps alone: at sampling time the model
    reads latents its own earlier errors have moved, and this trains it on inputs moved like that.
    """

    alphas_cumprod: Tensor
    prediction: str = "eps"
    min_snr_gamma: float | None = 5.0
    snr_offset: float = 0.0
    timestep_importance: float = 0.0
    input_perturbation: float = 0.0

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        if not 0.0 <= self.timestep_importance <= 1.0:
            raise ValueError(f"timestep_importance must be in [0, 1], not {self.timestep_importance!r}")
        if self.timestep_importance > 0 and self.min_snr_gamma is None:
            raise ValueError("timestep_importance draws timesteps by their min-SNR weight: set min_snr_gamma too")
        if not 0.0 <= self.input_perturbation <= 1.0:
            raise ValueError(f"input_perturbation must be in [0, 1] (0.1 is usual), not {self.input_perturbation!r}")
        # both depend only on the settings: computed once, not at every training step
        self._weights: Tensor | None = None
        if self.min_snr_gamma is not None:
            a = self.alphas_cumprod.double().cpu()
            snr = a / (1 - a)
            clipped = (snr + self.snr_offset).clamp(max=self.min_snr_gamma)
            self._weights = clipped / snr if self.prediction == "eps" else clipped / (snr + 1)
        self._probs: Tensor | None = None
        if self.timestep_importance > 0:
            w = self._weights
            self._probs = (1 - self.timestep_importance) / len(w) + self.timestep_importance * w / w.sum()

    def timestep_weights(self) -> Tensor | None:
        """The loss weight of every timestep (float64), or None for the plain mean squared error."""
        return self._weights

    def timestep_probs(self) -> Tensor | None:
        """Each timestep's probability of being drawn (float64), or None for uniform."""
        return self._probs

    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        cond: dict[str, Tensor],
        seeds: list[int],
    ) -> Tensor:
        weights, probs = self._weights, self._probs
        t, noise = per_sample_noise(seeds, tuple(x0.shape[1:]), len(self.alphas_cumprod), t_probs=probs)
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        a = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.ndim - 1)))
        seen = noise
        if self.input_perturbation > 0:  # a draw of its own per seed: the same on any batch split
            xi = randn_per_sample(seeds, tuple(x0.shape[1:]), salt=0x1B9).to(x0.device, x0.dtype)
            seen = noise + self.input_perturbation * xi
        xt = a.sqrt() * x0 + (1 - a).sqrt() * seen
        target = noise if self.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = model(xt, t, **cond)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
        if weights is not None:
            w = weights if probs is None else weights / (probs * len(probs))
            per = per * w[t.cpu()].to(per.device, per.dtype)
        return per.mean()


def sobel_edges(x: Tensor) -> Tensor:
    """Horizontal and vertical Sobel responses of every channel (B, 2C, H, W)."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([k, k.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels.repeat(c, 1, 1, 1), groups=c)


@dataclass
class AutoencoderObjective:
    """Reconstruction loss for the VAE: L1 + MSE on pixels, an edge term that keeps shapes sharp
    (Sobel responses, L1), and a small KL term toward N(0, I) that keeps the latent space smooth.

    `foreground_weight` multiplies the pixel terms on object pixels when a foreground mask is given
    (procedural data knows it): small objects are a few percent of an image, yet their colour and shape
    are what a prompt asks for.
    """

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    kl_weight: float = 1e-6
    foreground_weight: float = 1.0

    def loss(self, vae, images: Tensor, seeds: list[int], foreground: Tensor | None = None
             ) -> tuple[Tensor, dict[str, float]]:
        posterior = vae.encode(images)
        eps = randn_per_sample(seeds, tuple(posterior.mean.shape[1:]), salt=0x7A3)
        eps = eps.to(images.device, posterior.mean.dtype)
        z = posterior.mean + posterior.std * eps
        rec = vae.decode(z).float()
        images = images.float()
        w = torch.ones_like(images[:, :1])
        if foreground is not None and self.foreground_weight != 1.0:
            w = 1 + (self.foreground_weight - 1) * foreground.to(images.device, images.dtype)
        w = w / w.mean()
        l1 = ((rec - images).abs() * w).mean()
        mse = ((rec - images) ** 2 * w).mean()
        edge = (sobel_edges(rec) - sobel_edges(images)).abs().mean()
        kl = posterior.kl().mean() / images[0].numel()
        total = self.l1_weight * l1 + self.mse_weight * mse + self.edge_weight * edge + self.kl_weight * kl
        psnr = -10 * torch.log10(F.mse_loss(rec.clamp(-1, 1), images) / 4)
        return total, {"l1": l1.item(), "edge": edge.item(), "kl": kl.item(), "psnr": psnr.item()}
