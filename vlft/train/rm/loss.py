"""The reward model's loss and metrics, TRL 1.16's `RewardTrainer.compute_loss` formulas under its names.

Bradley-Terry (Bradley & Terry 1952; InstructGPT, arXiv 2203.02155, eq. 1): the probability that the chosen answer
is preferred is sigmoid(r_chosen - r_rejected), and the loss is its negative log-likelihood, averaged over the
pairs. TRL's optional per-pair `margin` (Llama 2, arXiv 2307.09288, eq. 2) is subtracted inside the sigmoid, and its
`center_rewards_coefficient` (Eisenstein et al., arXiv 2312.09244, eq. 2) adds coef * mean((r_chosen + r_rejected)^2),
which pulls the rewards towards mean zero (a Bradley-Terry model fixes only their differences).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """-mean(log sigmoid(r_c - r_r - margin)) + coef * mean((r_c + r_r)^2), a scalar.

    chosen, rejected: [B] rewards of each pair's chosen and rejected sequence; margin: [B] or None (0);
    center_rewards_coefficient: None or 0 leaves the centring term out. Source: trl/trainer/reward_trainer.py
    (1.16) `compute_loss`."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference.dtype)
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's RewardTrainer metrics of one batch (0-d tensors, detached): `accuracy` (the share of pairs whose chosen
    reward is the higher; a tie counts as wrong), `margin` (mean r_c - r_r, without the records' margins),
    `mean_reward`, `min_reward`, `max_reward` (over both sides' rewards)."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    both = torch.cat([chosen, rejected])
    return {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
            "mean_reward": both.mean(), "min_reward": both.min(), "max_reward": both.max()}
