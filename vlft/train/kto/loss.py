"""The KTO losses on sequence log-probs (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv 2402.01306): our own implementation of what TRL 1.16's `KTOTrainer._compute_loss`
(trl/trainer/kto_trainer.py) computes inline, under TRL's loss names and metric names.

For a record with prompt x, answer y and summed log-probs log pi(y|x), log pi_ref(y|x) (nats), r = log pi(y|x) -
log pi_ref(y|x) and the reference point z0 (`kl_estimate`):

    kto                desirable: 1 - sigmoid(beta * (r - z0))     undesirable: 1 - sigmoid(beta * (z0 - r))
    apo_zero_unpaired  desirable: 1 - sigmoid(beta * r)            undesirable: sigmoid(beta * r)
                       (the unpaired APO-zero, arXiv 2408.06266; z0 is not used)

each multiplied by --desirable_weight / --undesirable_weight; the loss is the mean over the micro-batch's records.
z0 = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x)) for mismatched answers y' (data/kto.py: the KL
rows), detached, and under several processes the mean of every process's mean (TRL's gather), then clamped.
tests/train/test_kto_loss.py checks loss, gradient and metrics against TRL's own `_compute_loss`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")


def check_loss_config(loss_type: str, beta: float, desirable_weight: float, undesirable_weight: float) -> list[str]:
    """Problems with the KTO loss flags, one sentence each naming the flag; empty when usable."""
    problems = []
    if loss_type not in LOSS_TYPES:
        problems.append(f"--loss_type {loss_type!r}: KTO's loss types are {', '.join(LOSS_TYPES)} (TRL's names)")
    if not beta > 0:
        problems.append(f"--beta must be > 0 (got {beta}); TRL's default is 0.1")
    for flag, value in (("--desirable_weight", desirable_weight), ("--undesirable_weight", undesirable_weight)):
        if not value > 0:
            problems.append(f"{flag} must be > 0 (got {value}); it weighs that label's losses (default 1)")
    return problems


def kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """KTO's reference point z0 from the KL rows: the batch mean of the policy's minus the reference's summed
    log-probs [B] of the mismatched answers, detached; with `gather` (accelerate's `gather`, a collective every
    process must call) the mean over processes of those means; clamped at 0. A 0-dim tensor (nats)."""
    kl = (kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        kl = gather(kl).mean()
    return kl.clamp(min=0)


@dataclass
class KTOLoss:
    loss: Tensor  # scalar: the mean over the B records of `losses`
    losses: Tensor  # [B]: each record's weighted loss, in batch order
    rewards: Tensor  # [B]: beta * (logps - ref_logps), detached (nats); rewards/chosen on desirable records


def kto_loss(logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor | float, *, loss_type: str = "kto",
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOLoss:
    """TRL 1.16's KTO loss for B records.

    logps, ref_logps: [B] summed answer log-probs (nats) of the policy (with gradient) and the reference.
    labels: [B] bool, True for desirable answers. kl: z0 (`kl_estimate`), read by loss_type "kto" only.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown KTO loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    labels = labels.to(torch.bool)
    logratios = logps - ref_logps
    if loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        desirable = 1 - torch.sigmoid(beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return KTOLoss(losses.nanmean(), losses, beta * logratios.detach())


def kto_metrics(rewards: Tensor, logps: Tensor, labels: Tensor, kl: Tensor,
                gather: Callable[[Tensor], Tensor] = lambda x: x) -> dict[str, float]:
    """TRL's logged KTO metrics of one micro-batch: kl; rewards/chosen, logps/chosen (sums over every process's
    desirable records / their count), rewards/rejected, logps/rejected, and rewards/margins (chosen - rejected)
    when both kinds are present. `gather` (a collective) runs once on every process, whatever its batch holds.
    (TRL's entropy and logits/* need the full logits, which vlft never builds: train/preference/logprobs.py.)"""
    labels = labels.to(torch.bool)
    logps = logps.detach()
    sums = torch.stack([rewards[labels].nansum(), logps[labels].nansum(), labels.sum().to(logps.dtype),
                        rewards[~labels].nansum(), logps[~labels].nansum(), (~labels).sum().to(logps.dtype)])
    total = gather(sums).reshape(-1, 6).sum(0).tolist()
    metrics = {"kl": float(kl)}
    for name, (reward, logp, n) in (("chosen", total[:3]), ("rejected", total[3:])):
        if n > 0:
            metrics[f"rewards/{name}"] = reward / n
            metrics[f"logps/{name}"] = logp / n
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
