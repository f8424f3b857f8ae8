"""KL between the policy and the reference policy: per-token estimators, the KL loss term, and KL coefficient control.

With log r = log pi(a) - log pi_ref(a) for a sampled token a ~ pi, the estimators of KL(pi || pi_ref) are
(http://joschu.net/blog/kl-approx.html, as in OpenRLHF's `kl_estimator`):

    k1 = log r                      unbiased, can be negative
    k2 = (log r)^2 / 2              biased, >= 0; as a loss its gradient is the unbiased KL gradient
    k3 = (1/r - 1) + log r = exp(-log r) - 1 + log r      unbiased, >= 0 (GRPO's KL loss)

KL enters training one of two ways: as a per-token reward penalty -kl_coef * k (`init_kl_coef`, see
`advantages.kl_shaped_token_rewards`), with the coefficient held fixed or steered by the adaptive controller of
Ziegler et al. 2019; or as a loss term kl_loss_coef * agg(k) (`use_kl_loss`), see `kl_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from hpc_rlhf.algos.masked import aggregate_loss, as_compute_dtype, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")


def compute_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    kl_estimator: str = "k1",
    *,
    log_ratio_clamp: Optional[float] = None,
    kl_clamp: Optional[float] = None,
) -> torch.Tensor:
    """Per-token KL estimate (k1, k2 or k3, see the module docstring) from log pi and log pi_ref, same shape.

    `log_ratio_clamp` bounds log r to [-c, c] before the estimator (guards k3's exp against overflow); `kl_clamp`
    bounds the estimate itself to [-c, c] (`algo.kl_clamp`, 10 as in OpenRLHF: k3 of log r = -3 is already 16.1, and
    one such token would dominate a KL penalty or loss). None = off.
    Values under padding are whatever the inputs hold there: mask them downstream.
    """
    check_same_shape("log_probs", log_probs, "ref_log_probs", ref_log_probs)
    log_ratio = as_compute_dtype(log_probs) - as_compute_dtype(ref_log_probs)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(min=-log_ratio_clamp, max=log_ratio_clamp)
    if kl_estimator == "k1":
        kl = log_ratio
    elif kl_estimator == "k2":
        kl = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    return kl if kl_clamp is None else kl.clamp(min=-kl_clamp, max=kl_clamp)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    kl_estimator: str = "k1",
    loss_agg_mode: str = "token_mean",
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
    kl_clamp: Optional[float] = None,
) -> torch.Tensor:
    """KL as a loss term (`use_kl_loss`): agg_{loss_agg_mode}(k(log pi, log pi_ref)) over action tokens.

    The trainer adds kl_loss_coef * kl_loss(...) to the policy loss. The gradient flows through `log_probs` only
    (and not through tokens whose estimate `kl_clamp` cut).
    """
    kl = compute_kl(log_probs, ref_log_probs.detach(), kl_estimator, kl_clamp=kl_clamp)
    return aggregate_loss(
        kl, action_mask, loss_agg_mode, norm_length=norm_length, num_tokens=num_tokens, num_seqs=num_seqs
    )


@dataclass
class FixedKLController:
    """A constant KL penalty coefficient (`init_kl_coef` with no `kl_target`)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt: the coefficient stays `value`."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by `state_dict`."""
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593), as OpenRLHF's AdaptiveKLController.

    After each rollout batch with observed KL `current_kl` over `n_steps` samples:
        e = clip(current_kl / target - 1, -0.2, 0.2)
        value <- value * (1 + e * n_steps / horizon)
    so the coefficient grows while KL is above target and shrinks while it is below.
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"kl_target must be positive, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"kl_horizon must be positive, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient toward keeping KL at `target` (see the class docstring)."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Coefficient, target and horizon, for checkpoints."""
        return {"value": float(self.value), "target": float(self.target), "horizon": int(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the state saved by `state_dict`."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


KLController = Union[FixedKLController, AdaptiveKLController]


def build_kl_controller(
    init_kl_coef: float, kl_target: Optional[float] = None, kl_horizon: int = 10000
) -> KLController:
    """The controller the config asks for: adaptive when `kl_target` is set, fixed otherwise."""
    if init_kl_coef < 0:
        raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
    if kl_target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, kl_target, kl_horizon)
