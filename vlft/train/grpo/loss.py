"""GRPO-family policy losses, group-relative advantages and reward statistics: our own implementation of what TRL
1.16's `GRPOTrainer` computes inline (trl/trainer/grpo_trainer.py: the advantage block of
`_generate_and_score_completions` and the loss of `_compute_loss`), so the vlft GRPO stage can use them on log-probs
and rewards it computes itself.

Formulas, names and order of operations are TRL's, restricted to: no vLLM importance-sampling correction, no
off-policy sequence mask (`off_policy_mask_threshold=None`), no high-entropy token mask (`top_entropy_quantile=1.0`),
no entropy bonus (`entropy_coef=0`), no MoE aux loss, and `multi_objective_aggregation="sum_then_normalize"`. Papers:
GRPO (arXiv 2402.03300), DAPO (2503.14476; clip-higher and token-level normaliser), Dr. GRPO (2503.20783), BNPO,
GSPO (sequence-level importance ratio, 2507.18071), INTELLECT-2 two-sided clipping (`delta`, 2505.07291), CISPO
(2506.13585), SAPO (2511.20347), LUSPO (2602.05261), VESPO (2602.10693), DeepSeek-V3.2's importance-weighted KL
(2512.02556), k3 KL estimator: exp(ref - logp) - (ref - logp) - 1.
tests/train/test_grpo_loss.py checks every loss type at both importance-sampling levels, with and without KL and
clipping, against TRL's own `_compute_loss` on the same fixed per-token log-probs (loss, gradient, logged metrics).

Units: log-probs in nats; B completions (rows), T completion positions; `per_token_logps[i, t]` is the log-prob of
completion token t of row i, and `completion_mask[i, t]` is 1 where that token counts in the loss (TRL's
`completion_mask`, times its `tool_mask` in multi-turn runs), 0 on padding.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO-style two-sided min/clip
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
STD_EPS = 1e-4  # TRL adds this to the reward std before dividing


# ------------------------------------------------------------------------------------------------ rewards, advantages

def resolve_scale_rewards(scale_rewards: str | bool) -> str:
    """TRL's GRPOConfig aliases: True -> "group", False -> "none"; anything else must be one of SCALE_REWARDS."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or True/False); "
                         f"got {scale_rewards!r}")
    return scale_rewards


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs, NaN where fewer than 2 values; TRL's `nanstd` arithmetic."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    bessel = torch.where(n > 1, n / (n - 1), torch.full_like(n / n, float("nan")))  # int / int: default float dtype
    std = torch.sqrt(var * bessel)
    return std.squeeze() if dim is None else std.squeeze(dim)


def weighted_rewards(per_func: Tensor, weights: Tensor) -> Tensor:
    """Per-completion reward: [N, F] x [F] -> [N].

    per_func[i, f] is reward function f's score of completion i, NaN where the function returned None (it does not
    apply to that completion). TRL's rule: the NaN-skipping sum over functions of weight * reward, so a None counts as
    0 -- except that a completion every function returned None for is unscorable and gets NaN (TRL then excludes it
    from the group baseline and gives it advantage 0; `group_advantages` does the same).
    """
    rewards = (per_func * weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = float("nan")
    return rewards


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group") -> tuple[Tensor, Tensor]:
    """Group-relative advantages: rewards [N] -> (advantages [N], is_std_zero [N] bool).

    N = prompts x num_generations with the generations of one prompt contiguous, rewards as `weighted_rewards` gives
    them, gathered over all processes (TRL normalises before slicing out the local part). TRL's formula:
    A_i = (r_i - mean of r over i's group) / (std + 1e-4), std = the unbiased std of i's group for "group", of the
    whole batch for "batch"; "none" does not divide (the group std is still computed, for `is_std_zero`). NaN rewards
    (unscorable completions) are left out of means and stds and get advantage 0. is_std_zero marks completions whose
    std (group, or batch for "batch") is 0: no learning signal; its mean is TRL's `frac_reward_zero_std`.
    """
    scale = resolve_scale_rewards(scale_rewards)
    if num_generations < 1 or rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be 1-D with a multiple of num_generations={num_generations} entries; "
                         f"got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, num_generations)
    baseline = torch.nanmean(groups, dim=1).repeat_interleave(num_generations, dim=0)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = _nanstd(groups, dim=1).repeat_interleave(num_generations, dim=0)
    else:  # one generation per prompt (TRL: eval with num_generations_eval=1)
        std = torch.zeros_like(rewards)
    advantages = rewards - baseline
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def reward_stats(per_func: Tensor, names: list[str], rewards: Tensor, num_generations: int,
                 scale_rewards: str | bool = "group") -> dict[str, float]:
    """TRL's logged reward metrics for one generation batch (all processes' completions).

    per_func [N, F] (NaN for None), names: the F reward functions' names, rewards [N] = weighted_rewards(per_func, w).
    Returns "rewards/{name}/mean" and "rewards/{name}/std" over the completions that function scored, "reward" and
    "reward_std" over the scorable completions, and "frac_reward_zero_std" (share of completions whose group -- or,
    with scale_rewards="batch", the batch -- has zero reward std).
    """
    if per_func.dim() != 2 or per_func.size(1) != len(names):
        raise ValueError(f"per_func must be [N, {len(names)}] for {len(names)} names; got {tuple(per_func.shape)}")
    stats = {}
    for f, name in enumerate(names):
        stats[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, f]).item()
        stats[f"rewards/{name}/std"] = _nanstd(per_func[:, f]).item()
    stats["reward"] = torch.nanmean(rewards).item()
    stats["reward_std"] = _nanstd(rewards).item()
    stats["frac_reward_zero_std"] = group_advantages(rewards, num_generations, scale_rewards)[1].float().mean().item()
    return stats


# ------------------------------------------------------------------------------------------------------------ loss

@dataclass
class GRPOLossOutput:
    loss: Tensor  # scalar to backpropagate; already divided for gradient accumulation, as TRL's is
    policy_loss: Tensor  # detached scalar: loss before the division by gradient_accumulation_steps (TRL's
    # "policy_loss"); for dapo/cispo/vespo, whose normaliser already spans the accumulation window, equal to loss
    clip_metrics: dict[str, float]  # TRL's loss-type metrics on this process's rows: clip_ratio/{low_mean, high_mean,
    # region_mean, low_min, high_max} for CLIPPED_LOSS_TYPES, cispo_clip_ratio for cispo, vespo/phi_seq_mean for vespo
    kl_mean: Tensor | None  # detached masked mean per-token KL (TRL's "kl"; importance-weighted as in the loss), or
    # None when beta == 0
    metric_terms: dict[str, Tensor] = field(default_factory=dict)  # the same metrics (and "kl") before the
    # cross-process reduction; `reduce_metrics(terms, all_reduce_sum, all_gather)` gives TRL's multi-process values


def reduce_metrics(terms: dict[str, Tensor], all_reduce_sum: Callable[[Tensor], Tensor] = lambda x: x,
                   all_gather: Callable[[Tensor], Tensor] = lambda x: x) -> dict[str, float]:
    """TRL's logged values from `GRPOLossOutput.metric_terms`, reduced over processes as TRL does it.

    Mean-type terms are [2] tensors (sum, count): summed over processes (`all_reduce_sum`, e.g.
    accelerator.reduce(x, "sum")), then sum / max(count, 1). "clip_ratio/low_min" and "clip_ratio/high_max" are
    per-row shares of clipped tokens [B] (NaN for a row without loss tokens at token level): gathered
    (`all_gather`, e.g. accelerator.gather), then NaN-skipping min / max. The defaults give this process's values.
    """
    out = {}
    for name, term in terms.items():
        if name in ("clip_ratio/low_min", "clip_ratio/high_max"):
            values = all_gather(term)
            values = values[~torch.isnan(values)]
            if values.numel() == 0:
                out[name] = float("nan")
            else:
                out[name] = (values.min() if name.endswith("min") else values.max()).item()
        else:
            total = all_reduce_sum(term)
            out[name] = (total[0] / total[1].clamp(min=1.0)).item()
    return out


SAMPLING_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@torch.no_grad()
def sampling_correction(old_per_token_logps: Tensor, sampling_per_token_logps: Tensor, completion_mask: Tensor, *,
                        mode: str = "sequence_mask", clip_min: float | None = None,
                        clip_max: float | None = 3.0) -> Tensor:
    """TRL 1.16's vLLM importance-sampling correction (`vllm_importance_sampling_correction`; truncated / masked
    importance sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
    the weight of each token (or row) for the gap between the sampler (vLLM) and the trainer's policy.

    old_per_token_logps [B, T]: the trainer's log-probs of the completion tokens under the policy that sampled them
        (nats); sampling_per_token_logps [B, T]: the sampler's, NaN where it gave none (a token it did not emit);
        completion_mask [B, T]: 1 on loss tokens.
    mode: token_* -> one ratio per token [B, T], exp(old - sampling); sequence_* -> one per row [B, 1], exp of the
        summed difference over the row's loss tokens. *_truncate clamps the ratio to [clip_min, clip_max]; *_mask
        sets ratios outside it to 0 (None: unbounded on that side). NaN differences count as 0 (ratio 1).
    Returns the ratio, no gradient; the loss multiplies each token's loss by it (`grpo_loss`)."""
    if mode not in SAMPLING_CORRECTION_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_CORRECTION_MODES}; got {mode!r}")
    gap = ((old_per_token_logps - sampling_per_token_logps) * completion_mask).nan_to_num(nan=0.0)
    if mode.startswith("sequence"):
        gap = gap.sum(-1, keepdim=True)
    ratio = torch.exp(gap)
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        return ratio
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


@torch.no_grad()
def vespo_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0, sampling_ratio: Tensor | None = None) -> Tensor:
    """VESPO's sequence weight phi(w) = exp(lambda) * w^k * exp(-lambda * w) [B, 1], no gradient.

    w = exp(sum over the row's loss tokens of log(pi / pi_old)), the per-token log-ratio clamped to [-20, 20] and
    log w to [log 1e-8, 20]; (k, lambda) = (k_pos, lambda_pos) for advantage >= 0, else (k_neg, lambda_neg). phi(1) = 1.
    advantages [B, 1], log_ratio and mask [B, T]. Computed in log space; NaN or inf become 0. sampling_ratio [B, T]
    (token modes of `sampling_correction`): log(pi_old / pi_sampler), clamped to [log 1e-8, 20], is added to log w.
    """
    log_w = torch.clamp(log_ratio, -20.0, 20.0).mul(mask).sum(dim=-1, keepdim=True)
    if sampling_ratio is not None:
        log_w = log_w + torch.clamp(torch.log(sampling_ratio), math.log(1e-8), 20.0).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(log_w, math.log(1e-8), 20.0)
    non_negative = advantages >= 0
    k = torch.where(non_negative, k_pos, k_neg)
    lam = torch.where(non_negative, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _mean_term(x: Tensor, mask: Tensor) -> Tensor:
    """(sum, count) of x over loss tokens, or over rows when x has one column (sequence-level ratios)."""
    if x.size(1) == 1:
        return torch.stack([x.sum(), torch.tensor(float(x.size(0)), device=x.device, dtype=x.dtype)]).detach()
    return torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]).detach()


def _row_share(x: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of x over loss tokens [B] (NaN for an empty row); x itself when it has one column."""
    if x.size(1) == 1:
        return x.squeeze(1).detach()
    return ((x * mask).sum(-1) / mask.sum(-1)).detach()


def grpo_loss(per_token_logps: Tensor, old_per_token_logps: Tensor | None, advantages: Tensor,
              completion_mask: Tensor, *, loss_type: str = "dapo", epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, delta: float | None = None, beta: float = 0.0,
              ref_per_token_logps: Tensor | None = None, kl_bias_correction: bool = True,
              importance_sampling_level: str = "token", max_completion_length: int | None = None,
              num_items_in_batch: Tensor | float | None = None, num_processes: int = 1,
              gradient_accumulation_steps: int = 1, steps_per_generation: int | None = None,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
              vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
              vespo_lambda_neg: float = 2.0, sampling_ratio: Tensor | None = None) -> GRPOLossOutput:
    """TRL 1.16's GRPO-family loss for one micro-batch of B completions.

    per_token_logps [B, T]: the policy's log-probs of the completion tokens (nats), carrying the gradient.
    old_per_token_logps [B, T] | None: the same under the policy that sampled the batch; None when the batch is used
        for one optimizer step only (num_iterations=1): TRL then takes per_token_logps.detach(), so the ratio is 1.
    advantages [B] (or [B, T] per-token advantages): from `group_advantages`, this process's slice.
    completion_mask [B, T]: 1 on loss tokens.
    loss_type: one of LOSS_TYPES; TRL's default is "dapo".
    epsilon_low, epsilon_high: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high] (TRL's `epsilon` and
        `epsilon_high`, the latter defaulting to the former). For cispo, epsilon_high is the ratio's upper bound itself
        (TRL recommends 5.0; left at 0.2, every on-policy token is weighted 0.2).
    delta: INTELLECT-2's extra upper bound on the unclipped ratio (TRL's `delta`), or None.
    beta: KL coefficient; beta != 0 needs ref_per_token_logps [B, T] (the reference model's log-probs). The per-token
        KL is k3: exp(ref - logp) - (ref - logp) - 1, times the importance ratio when kl_bias_correction (TRL's
        `use_bias_correction_kl`, default True).
    importance_sampling_level: "token" (one ratio per token) or "sequence" (GSPO: one ratio per row, exp of the mean
        log-ratio over its loss tokens).
    Aggregation (L_i = row i's loss tokens, l_it the per-token loss):
        grpo, sapo: mean over rows of (sum_t l_it / max(L_i, 1));  bnpo: sum l / max(sum L, 1);
        dr_grpo: sum l / (B * max_completion_length);  luspo: mean over rows of sum_t l_it;
        dapo, cispo, vespo: sum l / (num_items_in_batch / num_processes * gradient_accumulation_steps /
        steps_per_generation), num_items_in_batch = loss tokens in the whole generation batch summed over all
        processes (TRL's inputs["num_items_in_batch"], clamped to >= 1; None -> this micro-batch's token count);
        steps_per_generation None -> gradient_accumulation_steps (TRL's default), so the normaliser is the generation
        batch's tokens per process and the accumulated, process-averaged gradient is that of sum l / all tokens.
    grpo, bnpo, dr_grpo, sapo, luspo are then divided by gradient_accumulation_steps (TRL's
        current_gradient_accumulation_steps). For evaluation pass gradient_accumulation_steps=1 and
        steps_per_generation=1, as TRL does.
    sapo_temperature_*: SAPO's gate temperatures for advantage > 0 / <= 0. vespo_*: VESPO's gamma weight parameters.
    sampling_ratio [B, T] or [B, 1] | None: `sampling_correction`'s weights (vLLM rollouts): each token's policy loss
        (before the KL term) is multiplied by it; for vespo ([B, T] only) it enters the gamma weight instead (TRL).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; valid types: {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence'; got {importance_sampling_level!r}")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss type 'dr_grpo' needs max_completion_length")
    if per_token_logps.shape != completion_mask.shape or per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps {tuple(per_token_logps.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B, T]")

    mask = completion_mask.to(per_token_logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()

    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio  # [B, T]
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(log_weights)

    if beta != 0.0:
        ref_gap = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(ref_gap) - ref_gap - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio

    terms: dict[str, Tensor] = {}
    if loss_type == "cispo":  # REINFORCE with the (detached) ratio capped at epsilon_high
        capped = torch.clamp(ratio, max=epsilon_high).detach()
        per_token_loss = -capped * adv * per_token_logps
        terms["cispo_clip_ratio"] = _mean_term(((ratio > epsilon_high) & (adv > 0)).to(mask.dtype), mask)
    elif loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:  # caps the unclipped branch only; the clip statistics below see the capped ratio
            ratio = torch.clamp(ratio, max=delta)
        per_token_loss = -torch.min(ratio * adv, clipped * adv)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        terms["clip_ratio/low_mean"] = _mean_term(low, mask)
        terms["clip_ratio/high_mean"] = _mean_term(high, mask)
        terms["clip_ratio/region_mean"] = _mean_term(torch.maximum(low, high), mask)
        terms["clip_ratio/low_min"] = _row_share(low, mask)
        terms["clip_ratio/high_max"] = _row_share(high, mask)
    elif loss_type == "sapo":  # smooth gate sigmoid(tau (r - 1)) * 4 / tau in place of the hard clip
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)  # float32, as in TRL
        per_token_loss = -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv
    else:  # vespo
        phi = vespo_weights(adv, log_ratio, mask, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                            sampling_ratio=sampling_ratio)
        per_token_loss = -phi * adv * per_token_logps
        terms["vespo/phi_seq_mean"] = _mean_term(phi, mask)
    if sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * sampling_ratio

    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
        terms = {"kl": _mean_term(per_token_kl, mask), **terms}

    masked = per_token_loss * mask  # [B, T] (a [B, 1] per-row loss broadcasts over the row's tokens)
    if loss_type in ("grpo", "sapo"):
        policy_loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        policy_loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        policy_loss = masked.sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "luspo":
        policy_loss = masked.sum(-1).mean()
    else:  # dapo, cispo, vespo
        if num_items_in_batch is None:
            num_items_in_batch = mask.sum()
        tokens = torch.as_tensor(num_items_in_batch, device=mask.device).clamp(min=1.0)
        normaliser = tokens / num_processes
        spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
        normaliser = normaliser * gradient_accumulation_steps / spg
        policy_loss = masked.sum() / normaliser
    if loss_type in ("dapo", "cispo", "vespo"):
        loss = policy_loss
    else:
        loss = policy_loss / gradient_accumulation_steps

    kl_mean = None
    if beta != 0.0:
        kl_mean = terms["kl"][0] / terms["kl"][1].clamp(min=1.0)
    clip_metrics = reduce_metrics({k: v for k, v in terms.items() if k != "kl"})
    return GRPOLossOutput(loss=loss, policy_loss=policy_loss.detach(), clip_metrics=clip_metrics, kl_mean=kl_mean,
                          metric_terms=terms)
