"""DPO-family preference losses on sequence log-probs: our own implementation of the losses TRL 1.16's
`DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) computes inline, so the vlft DPO stage can use them on
log-probs it computes itself.

Formulas, names and order of operations are TRL's, restricted to `f_divergence_type="reverse_kl"`, no WPO
weighting (`use_weighting=False`) and no MoE aux loss. Papers: DPO (sigmoid, arXiv 2305.18290), IPO (2310.12036),
EXO (exo_pair, 2402.00856), NCA (nca_pair, 2402.05369), robust DPO (2403.00409), BCO (bco_pair, 2404.04656),
SPPO (sppo_hard, 2405.00675), AOT (aot / aot_unpaired, 2406.05882), APO (apo_zero / apo_down, 2408.06266),
DiscoPOP (2406.08414), RPO (sigmoid + sft, 2404.19733), LD-DPO (ld_alpha, 2409.06411).
tests/train/test_dpo_loss.py checks that every loss type, the LD-DPO weighting and the logged reward metrics equal
what TRL's own `_compute_loss` gives on the same fixed per-token log-probs.

Units: log-probs in nats; a batch of B pairs is laid out as 2B rows, [chosen rows; rejected rows].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm"}


def check_loss_config(loss_type: Sequence[str], loss_weights: Sequence[float] | None, beta: float,
                      label_smoothing: float) -> list[str]:
    """Problems with a loss configuration, one sentence each naming the flag to change; empty when it is usable."""
    problems = []
    if not loss_type:
        problems.append(f"--loss_type is empty; give one or more of: {', '.join(LOSS_TYPES)}")
    unknown = [t for t in loss_type if t not in LOSS_TYPES]
    if unknown:
        problems.append(f"--loss_type: unknown {', '.join(map(repr, unknown))}; valid types: {', '.join(LOSS_TYPES)}")
    repeated = sorted({t for t in loss_type if list(loss_type).count(t) > 1})
    if repeated:
        problems.append(f"--loss_type lists {', '.join(map(repr, repeated))} more than once; give each type once "
                        "and set its share with --loss_weights")
    if loss_weights is not None and len(loss_weights) != len(loss_type):
        problems.append(f"--loss_weights has {len(loss_weights)} values for {len(loss_type)} --loss_type entries; "
                        "give one weight per loss type (or none, for 1.0 each)")
    if not beta > 0:
        problems.append(f"--beta must be > 0 (got {beta}); TRL's default is 0.1")
    if "robust" in loss_type and not 0.0 <= label_smoothing < 0.5:
        problems.append(f"--label_smoothing must lie in [0, 0.5) for the robust loss (got {label_smoothing}): it is "
                        "the label-flip probability and the loss divides by 1 - 2 * label_smoothing; try 0.1")
    if "exo_pair" in loss_type and not 0.0 < label_smoothing < 1.0:
        problems.append(f"--label_smoothing must lie in (0, 1) for the exo_pair loss (got {label_smoothing}): "
                        "it takes log(label_smoothing); the EXO paper suggests 1e-3")
    return problems


def sequence_logps(per_token_logps: Tensor, completion_mask: Tensor, ld_alpha: float | None = None) -> Tensor:
    """Summed log-prob (nats) of each sequence's completion: [2B, T] x [2B, T] -> [2B].

    `per_token_logps[i, t]` is the log-prob of the token that follows position t, and `completion_mask` is the
    matching *shifted* mask (1 where that next token is a completion token), rows laid out [chosen; rejected].
    Positions outside the mask are zeroed here, not assumed zero. With `ld_alpha` (LD-DPO), each pair's first
    min(chosen_len, rejected_len) completion tokens count fully and the longer completion's remaining tokens are
    scaled by ld_alpha, as TRL does it.
    """
    logps = per_token_logps * completion_mask
    if ld_alpha is None:
        return logps.sum(dim=1)
    position = completion_mask.cumsum(dim=1)  # 1-based index among completion tokens, 0 on the prompt
    chosen_len, rejected_len = completion_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_len, rejected_len)
    shared = torch.cat([shared, shared], dim=0).to(per_token_logps.device).unsqueeze(1)
    in_shared = (position > 0) & (position <= shared)
    in_tail = position > shared
    return (logps * in_shared).sum(dim=1) + ld_alpha * (logps * in_tail).sum(dim=1)


@dataclass
class PreferenceLoss:
    loss: Tensor  # scalar: sum over loss types of weight * (mean over pairs of that type's loss)
    per_pair: Tensor  # [B]: sum over loss types of weight * per-pair loss; its mean equals `loss` up to rounding
    chosen_rewards: Tensor  # [B]: beta * (chosen_logps - ref_chosen_logps), detached, nats
    rejected_rewards: Tensor  # [B]: beta * (rejected_logps - ref_rejected_logps), detached, nats


def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                    *, loss_type: Sequence[str] = ("sigmoid",), loss_weights: Sequence[float] | None = None,
                    beta: float = 0.1, label_smoothing: float = 0.0, discopop_tau: float = 0.05,
                    completion_lengths: Tensor | None = None, per_token_logps: Tensor | None = None,
                    completion_mask: Tensor | None = None) -> PreferenceLoss:
    """TRL 1.16's weighted sum of DPO-family losses for B pairs.

    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed log-probs (nats), e.g. the two
        halves of `sequence_logps(...)`; the policy ones carry the gradient.
    completion_lengths: [2B] completion token counts, [chosen; rejected], needed by ipo and sigmoid_norm (which average
        the log-ratio per token). TRL counts the *unshifted* completion mask, `completion_mask.sum(1)` over input_ids;
        it equals the shifted count whenever position 0 is a prompt token.
    per_token_logps, completion_mask: [2B, T] policy per-token log-probs and the *shifted* mask aligned with them (as
        given to `sequence_logps`), needed by sft (RPO's NLL term: mean -log-prob over all chosen completion tokens).
    For aot and aot_unpaired the per-pair losses come from batch-sorted log-ratios, so they are not tied to a pair.
    """
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_type)
    if not loss_type or len(loss_weights) != len(loss_type):
        raise ValueError(f"need one weight per loss type; got loss_type={list(loss_type)}, "
                         f"loss_weights={list(loss_weights)}")
    if completion_lengths is None and _NEEDS_LENGTHS.intersection(loss_type):
        raise ValueError(f"loss types {sorted(_NEEDS_LENGTHS.intersection(loss_type))} need completion_lengths")
    if "sft" in loss_type and (per_token_logps is None or completion_mask is None):
        raise ValueError("loss type 'sft' needs per_token_logps and completion_mask")

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios  # reverse KL: the scores are the log-ratios themselves
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios

    def per_token_delta():
        chosen_len, rejected_len = completion_lengths.chunk(2, dim=0)
        return chosen_logratios / chosen_len.clamp(min=1.0) - rejected_logratios / rejected_len.clamp(min=1.0)

    def smoothed_sigmoid(margin):  # aot's label-smoothed logistic loss
        return -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing

    loss, per_pair = 0.0, 0.0
    for name, weight in zip(loss_type, loss_weights):
        if name == "sigmoid":
            losses = -F.logsigmoid(beta * delta)
        elif name == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif name == "ipo":  # Eq. 17 with beta as tau, on per-token log-ratios
            losses = (per_token_delta() - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":  # KL(model's pair distribution || [1 - eps, eps]), Eq. 16
            eps = torch.tensor(label_smoothing, device=delta.device)
            p_chosen, p_rejected = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
            losses = (p_chosen * (F.logsigmoid(beta * delta) - torch.log1p(-eps))
                      + p_rejected * (F.logsigmoid(-beta * delta) - torch.log(eps)))
        elif name == "nca_pair":
            losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                      - 0.5 * F.logsigmoid(-rejected_rewards))
        elif name == "robust":
            kept = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta)
            losses = (kept - flipped) / (1 - 2 * label_smoothing)
        elif name == "bco_pair":
            losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
        elif name == "sppo_hard":  # hard preference probabilities: 1 for the winner, 0 for the loser
            losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif name == "aot":
            policy_sorted = torch.sort(chosen_logps - rejected_logps, dim=0)[0]
            ref_sorted = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
            losses = smoothed_sigmoid(policy_sorted - ref_sorted)
        elif name == "aot_unpaired":
            losses = smoothed_sigmoid(torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0])
        elif name == "apo_zero":  # Eq. 7: raise chosen, lower rejected
            losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":  # Eq. 8: lower both, rejected more
            losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * delta))
        elif name == "discopop":  # Eq. 5: logistic and exponential losses mixed by sigmoid(logits / tau)
            logits = delta * beta
            mix = torch.sigmoid(logits / discopop_tau)
            losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
        elif name == "sft":  # one batch-level NLL, repeated per pair
            chosen_mask = completion_mask.chunk(2, dim=0)[0]
            chosen_token_logps = per_token_logps.chunk(2, dim=0)[0]
            losses = (-chosen_token_logps[chosen_mask.bool()].mean()).expand(chosen_token_logps.size(0))
        elif name == "sigmoid_norm":
            losses = -F.logsigmoid(beta * per_token_delta())
        else:
            raise ValueError(f"unknown loss type {name!r}; valid types: {', '.join(LOSS_TYPES)}")
        loss = loss + losses.mean() * weight
        per_pair = per_pair + losses * weight
    return PreferenceLoss(loss=loss, per_pair=per_pair, chosen_rewards=chosen_rewards.detach(),
                          rejected_rewards=rejected_rewards.detach())


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                   rejected_logps: Tensor) -> dict[str, Tensor]:
    """TRL's logged DPO metrics as detached per-pair [B] tensors; the caller gathers them across processes and
    takes the mean, which is what TRL logs."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach()}

