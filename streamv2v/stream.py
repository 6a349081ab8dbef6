"""Stream-batch denoising math: the LCM schedule as per-slot coefficient tensors, and short pure
functions over latents. Device- and dtype-agnostic: every tensor follows the one it is given.

With k steps, slot i of the stream batch holds a latent at the i-th timestep of the short schedule
(slot 0 the noisiest). One batched UNet call denoises every slot once; slot i's x0 estimate is
re-noised to timestep i+1 and moves to slot i+1, so the last slot yields the frame of k-1 calls ago.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamv2v.config import SCHEDULE_STEPS


@dataclass(frozen=True)
class StreamSchedule:
    """Per-slot constants of the short schedule, shaped ``[k, 1, 1, 1]`` for broadcasting."""

    timesteps: torch.Tensor  #: [k] long, the UNet's timestep of each slot
    alpha: torch.Tensor  #: sqrt(alpha_bar_t)
    beta: torch.Tensor  #: sqrt(1 - alpha_bar_t)
    x_coef: torch.Tensor  #: denoised = x_coef * x_t + pred_coef * model_output
    pred_coef: torch.Tensor
    #: alpha/beta of the next slot (1 for the last): the residual-CFG noise estimate's scale
    next_ratio: torch.Tensor

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]


def make_schedule(
    scheduler, t_indices: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> StreamSchedule:
    """Pick ``t_indices`` from the scheduler's 50-step LCM schedule and fold the LCM boundary
    scalings (c_skip, c_out) and the x0 parametrisation into two coefficients per slot.

    Computed in float64 once, then cast: nothing here runs per frame.
    """
    scheduler.set_timesteps(SCHEDULE_STEPS, original_inference_steps=SCHEDULE_STEPS)
    all_t = scheduler.timesteps.tolist()
    ts = [int(all_t[i]) for i in t_indices]
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    a_bar = torch.stack([alphas_cumprod[t] for t in ts])
    alpha, beta = a_bar.sqrt(), (1.0 - a_bar).sqrt()
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in ts]
    c_skip = torch.tensor([s[0] for s in scalings], dtype=torch.float64)
    c_out = torch.tensor([s[1] for s in scalings], dtype=torch.float64)

    kind = scheduler.config.prediction_type
    if kind == "epsilon":  # x0 = (x - beta * eps) / alpha
        x0_x, x0_pred = 1.0 / alpha, -beta / alpha
    elif kind == "v_prediction":  # x0 = alpha * x - beta * v
        x0_x, x0_pred = alpha, -beta
    elif kind == "sample":
        x0_x, x0_pred = torch.zeros_like(alpha), torch.ones_like(alpha)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")

    def per_slot(v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, 1, 1, 1).to(device=device, dtype=dtype)

    next_ratio = torch.cat([alpha[1:] / beta[1:], torch.ones(1, dtype=torch.float64)])
    return StreamSchedule(
        timesteps=torch.tensor(ts, dtype=torch.long, device=device),
        next_ratio=per_slot(next_ratio),
        alpha=per_slot(alpha),
        beta=per_slot(beta),
        x_coef=per_slot(c_skip + c_out * x0_x),
        pred_coef=per_slot(c_out * x0_pred),
    )


def denoise(x_t: torch.Tensor, model_output: torch.Tensor, x_coef, pred_coef) -> torch.Tensor:
    """LCM's consistency-boundary x0 estimate of ``x_t``, all slots at once."""
    return torch.addcmul(x_coef * x_t, model_output, pred_coef)


def renoise(x0: torch.Tensor, alpha, beta_noise: torch.Tensor, out: torch.Tensor | None = None):
    """``alpha * x0 + beta * noise`` with ``beta * noise`` precomputed (the noise is fixed)."""
    return torch.addcmul(beta_noise, x0, alpha, out=out)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return torch.lerp(uncond, cond, scale)


def update_stock_noise(
    stock: torch.Tensor,
    guided: torch.Tensor,
    sched: StreamSchedule,
    slots: slice,
    next_noise: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual CFG ("self"/"initialize", StreamDiffusion's recurrence): from each slot's estimate
    ``stock`` of the unconditional noise and the ``guided`` prediction of this call, the estimate
    of the noise that slot's frame will carry at its *next* timestep::

        next = x0(guided, beta_t * stock) * alpha_next / beta_next + noise_next

    ``x0`` is the LCM step of the call's slots, ``alpha_next/beta_next`` the next slot's (1 after
    the last) and ``noise_next`` the fixed noise of the next slot (slot 0's after the last). The
    result belongs to the *next* slot: the caller moves it one slot on, with its frame. Feeding it
    back into the same slot instead is a recurrence with gain > 1 that diverges within frames.
    """
    b = sched.beta[slots]
    delta_x = denoise(b * stock, guided, sched.x_coef[slots], sched.pred_coef[slots])
    return torch.addcmul(next_noise, delta_x, sched.next_ratio[slots], out=out)
