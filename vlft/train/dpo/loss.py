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

The pair stage's reference-free losses (no reference model at all; `reference_free_loss`): CPO (cpo, cpo_hinge,
cpo_ipo: arXiv 2401.08417) and SimPO (simpo: 2405.14734) as TRL 1.16's `CPOTrainer.cpo_loss` +
`get_batch_loss_metrics` compute them (trl/experimental/cpo/), ORPO (orpo: 2403.07691) as `ORPOTrainer.
odds_ratio_loss` + `get_batch_loss_metrics` (trl/experimental/orpo/); tests/train/test_pair_losses.py checks them
against those methods.

Units: log-probs in nats; a batch of B pairs is laid out as 2B rows, [chosen rows; rejected rows].
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# TRL's DPOTrainer loss types: all of them compare the policy with a reference
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# reference-free: vlft's name -> (TRL trainer, its loss_type). CPOTrainer's sigmoid / hinge / ipo share their names
# with DPO's reference losses, so they are spelled cpo, cpo_hinge, cpo_ipo here; simpo and orpo are the names TRL's
# CPOTrainer / ORPOTrainer and LLaMA-Factory's `pref_loss` use.
REFERENCE_FREE: dict[str, tuple[str, str]] = {
    "cpo": ("CPOTrainer", "sigmoid"), "cpo_hinge": ("CPOTrainer", "hinge"), "cpo_ipo": ("CPOTrainer", "ipo"),
    "simpo": ("CPOTrainer", "simpo"), "orpo": ("ORPOTrainer", "orpo")}
ALL_LOSS_TYPES: tuple[str, ...] = LOSS_TYPES + tuple(REFERENCE_FREE)  # what --loss_type accepts
# the reference-free types that score a completion by its mean token log-prob, not the sum (TRL's
# average_log_prob=True: CPOTrainer for ipo and simpo, ORPOTrainer always)
_LENGTH_NORMALISED = {"cpo_ipo", "simpo", "orpo"}
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm"}


def needs_reference(loss_type: Sequence[str]) -> bool:
    """False when the loss is reference-free (any of REFERENCE_FREE; `check_loss_config` refuses mixing one with
    other types), True otherwise."""
    return not any(t in REFERENCE_FREE for t in loss_type)


def check_loss_config(loss_type: Sequence[str], loss_weights: Sequence[float] | None, beta: float,
                      label_smoothing: float) -> list[str]:
    """Problems with a loss configuration, one sentence each naming the flag to change; empty when it is usable."""
    problems = []
    if not loss_type:
        problems.append(f"--loss_type is empty; give one or more of: {', '.join(ALL_LOSS_TYPES)}")
    unknown = [t for t in loss_type if t not in ALL_LOSS_TYPES]
    if unknown:
        problems.append(f"--loss_type: unknown {', '.join(map(repr, unknown))}; valid types: "
                        f"{', '.join(ALL_LOSS_TYPES)}")
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
    free = [t for t in loss_type if t in REFERENCE_FREE]
    if free and len(loss_type) > 1:
        problems.append(f"--loss_type {','.join(loss_type)}: {free[0]} is reference-free and carries its own NLL term "
                        "(--cpo_alpha for cpo/simpo, built into orpo), so it cannot be mixed with other loss types "
                        f"(a reference loss would load the reference model it saves); give --loss_type {free[0]} alone")
    elif free and loss_weights is not None:
        problems.append(f"--loss_weights does not apply to --loss_type {free[0]} (one loss, TRL's form); drop it "
                        "(scale the NLL term with --cpo_alpha for cpo/simpo, the odds-ratio term with --beta for orpo)")
    if free and free[0] in ("cpo_hinge", "cpo_ipo", "orpo") and label_smoothing:
        problems.append(f"--label_smoothing {label_smoothing} has no effect on --loss_type {free[0]} (TRL ignores it "
                        "there too); drop it, or use cpo or simpo, whose logistic loss it smooths")
    elif free and not 0.0 <= label_smoothing < 0.5:
        problems.append(f"--label_smoothing must lie in [0, 0.5) for --loss_type {free[0]} (got {label_smoothing}): "
                        "it is the probability that a pair's labels are flipped")
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
        elif name in REFERENCE_FREE:
            raise ValueError(f"loss type {name!r} is reference-free: reference_free_loss computes it")
        else:
            raise ValueError(f"unknown loss type {name!r}; valid types: {', '.join(LOSS_TYPES)}")
        loss = loss + losses.mean() * weight
        per_pair = per_pair + losses * weight
    return PreferenceLoss(loss=loss, per_pair=per_pair, chosen_rewards=chosen_rewards.detach(),
                          rejected_rewards=rejected_rewards.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, switching at -log 2 between log1p(-exp(x)) and log(-expm1(x)) so that neither
    cancels (Maechler, "Accurately computing log(1 - exp(-|a|))", 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class ReferenceFreeLoss:
    loss: Tensor  # scalar: mean over pairs of the preference term, plus the NLL term
    per_pair: Tensor  # [B]: the preference term of each pair (without the batch-level NLL term)
    chosen_logps: Tensor  # [B] the scores compared (nats): sums for cpo / cpo_hinge, means per token otherwise
    rejected_logps: Tensor  # [B], as chosen_logps
    chosen_rewards: Tensor  # [B]: beta * chosen_logps, detached (TRL's CPO / ORPO reward)
    rejected_rewards: Tensor  # [B]: beta * rejected_logps, detached
    nll: Tensor  # scalar: mean -log-prob over every chosen completion token of the batch (detached)
    extra: dict[str, Tensor]  # further logged scalars (orpo: log_odds_ratio, log_odds_chosen), detached


def reference_free_loss(per_token_logps: Tensor, completion_mask: Tensor, *, loss_type: str, beta: float = 0.1,
                        label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                        cpo_alpha: float = 1.0) -> ReferenceFreeLoss:
    """A reference-free pair loss on the policy's per-token log-probs of one forward; TRL 1.16's formulas.

    per_token_logps, completion_mask: [2B, T], rows [chosen; rejected], the mask *shifted* as `sequence_logps`
        takes it (1 where the log-prob is that of a completion token). A row's score is the sum of its completion
        log-probs (cpo, cpo_hinge) or their mean per completion token (cpo_ipo, simpo, orpo: the length normalisation
        of SimPO and ORPO, TRL's `average_log_prob=True`), both from these tensors: no second forward.
    loss_type: one of REFERENCE_FREE.
        cpo / cpo_hinge / cpo_ipo / simpo (CPOTrainer, arXiv 2401.08417, 2405.14734): with h = chosen - rejected
            scores, sigmoid: -logsigmoid(beta h) (1 - eps) - logsigmoid(-beta h) eps (eps = label_smoothing);
            hinge: relu(1 - beta h); ipo: (h - 1 / (2 beta))^2; simpo: sigmoid's with h - simpo_gamma / beta.
            loss = mean over pairs + cpo_alpha * NLL (CPO's behaviour-cloning term; cpo_alpha = 0 gives the
            SimPO paper's loss).
        orpo (ORPOTrainer, arXiv 2403.07691, Eqs. 4-7): log odds(y) = s - log(1 - exp(s)) on the mean scores s,
            ratio = logsigmoid(log odds(chosen) - log odds(rejected)), loss = NLL - beta * mean(ratio) (beta is the
            paper's lambda).
    NLL: the mean of -log-prob over all chosen completion tokens of the batch (TRL's CrossEntropyLoss on the chosen
        rows' labels). TRL's ORPOTrainer takes it over the chosen rows' prompt tokens too; vlft, like the ORPO paper
        (Eq. 6) and CPO, over the answer only (a VLM prompt is mostly picture placeholders): the two agree on pairs
        without a prompt.
    Rewards (logged, as TRL): beta * score. A row without completion tokens scores 0 (TRL: 0 / 0)."""
    if loss_type not in REFERENCE_FREE:
        raise ValueError(f"unknown reference-free loss type {loss_type!r}; valid types: {', '.join(REFERENCE_FREE)}")
    mask = completion_mask.to(per_token_logps.dtype)
    scores = (per_token_logps * mask).sum(dim=1)
    if loss_type in _LENGTH_NORMALISED:
        scores = scores / mask.sum(dim=1).clamp(min=1.0)
    chosen, rejected = scores.chunk(2, dim=0)
    chosen_mask = completion_mask.chunk(2, dim=0)[0].bool()
    nll = -per_token_logps.chunk(2, dim=0)[0][chosen_mask].mean()
    extra = {}
    scored = chosen, rejected  # what the rewards are made of
    if loss_type == "orpo":
        scored = chosen.float(), rejected.float()  # TRL computes the odds in float32 at least
        c, r = scored
        log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        per_pair = -beta * ratio  # TRL keeps beta * ratio and subtracts its mean
        loss = nll - (beta * ratio).mean()
        extra = {"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
    else:
        margin = chosen - rejected
        if loss_type == "simpo":
            margin = margin - simpo_gamma / beta
        if loss_type in ("cpo", "simpo"):
            per_pair = (-F.logsigmoid(beta * margin) * (1 - label_smoothing)
                        - F.logsigmoid(-beta * margin) * label_smoothing)
        elif loss_type == "cpo_hinge":
            per_pair = torch.relu(1 - beta * margin)
        else:  # cpo_ipo: Eq. 17 of IPO with beta as tau, on the mean scores
            per_pair = (margin - 1 / (2 * beta)) ** 2
        loss = per_pair.mean() + (cpo_alpha * nll if cpo_alpha else 0.0)  # TRL: no NLL term at cpo_alpha 0
    return ReferenceFreeLoss(loss=loss, per_pair=per_pair, chosen_logps=chosen, rejected_logps=rejected,
                             chosen_rewards=(beta * scored[0]).detach(), rejected_rewards=(beta * scored[1]).detach(),
                             nll=nll.detach(), extra=extra)


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

