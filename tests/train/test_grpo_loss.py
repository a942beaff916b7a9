"""vlft/train/grpo/loss.py against its oracle, TRL 1.16's own `GRPOTrainer._compute_loss`: on the same fixed per-token
log-probs, every loss type at both importance-sampling levels, with and without KL, on- and off-policy with clipping
active, gives the same loss, gradient and logged metrics. Plus closed forms at ratio 1, the gradient against an
independent plain formula, zero gradient on clipped tokens, the first pass of a kept rollout (--num_iterations > 1)
equal to the pass against its own log-probs, zero KL at the reference, and hand-computed advantages and reward
statistics."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd as trl_nanstd

from vlft.train.grpo.loss import (
    CLIPPED_LOSS_TYPES,
    LOSS_TYPES,
    SCALE_REWARDS,
    _nanstd,
    group_advantages,
    grpo_loss,
    reduce_metrics,
    resolve_scale_rewards,
    reward_stats,
    weighted_rewards,
)

T = 12
LENGTHS = [3, 12, 0, 7, 5]  # completion tokens per row; row 2 is empty (masked out entirely, e.g. truncated)
B = len(LENGTHS)
ADVANTAGES = [1.2, -0.7, 0.4, 0.9, -1.5]
EPS_LOW, EPS_HIGH = 0.2, 0.28
MAX_COMPLETION_LENGTH = 16
# (gradient_accumulation_steps, num_processes, steps_per_generation, num_items_in_batch or None = local token count)
ACCUM = {"single": (1, 1, 1, None), "accum": (2, 2, 4, 97)}


def _batch(off_policy: bool, beta: float):
    """Fixed float64 log-probs [B, T] (non-zero on padding too), advantages, mask and, when asked, old/ref log-probs.
    Off-policy, per-row offsets push whole rows (and so sequence-level ratios) outside the clip range."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logps = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    old = None
    if off_policy:
        row_shift = torch.tensor([0.5, -0.45, 0.0, 0.05, 0.35], dtype=torch.float64).unsqueeze(1)
        old = logps - row_shift - 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64) if beta else None
    return logps, old, torch.tensor(ADVANTAGES, dtype=torch.float64), mask, ref


def _trl(logps, old, advantages, mask, ref, *, loss_type, level, beta, accum, delta=None, bias_correction=True,
         sampling_ratio=None):
    """TRL's loss and logged metrics from a GRPOTrainer built bare with only what `_compute_loss` reads; the model's
    forward is replaced by a stub of `_get_per_token_logps_and_entropies` returning the fixed log-probs."""
    ga, procs, spg, n_items = accum
    trainer = object.__new__(GRPOTrainer)
    trainer.model = torch.nn.Linear(1, 1)  # only .training is read
    entropies = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def stub(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert input_ids.shape == (B, 2 + T) and logits_to_keep == T
        return logps, entropies, None

    trainer._get_per_token_logps_and_entropies = stub
    trainer.accelerator = SimpleNamespace(num_processes=procs, gather=lambda x: x, reduce=lambda x, reduction: x)
    trainer.args = SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, steps_per_generation=spg,
                                   sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                                   vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.epsilon_low, trainer.epsilon_high = EPS_LOW, EPS_HIGH
    trainer.max_completion_length, trainer.current_gradient_accumulation_steps = MAX_COMPLETION_LENGTH, ga
    trainer.top_entropy_quantile, trainer.off_policy_mask_threshold = 1.0, None
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = sampling_ratio is not None
    trainer.aux_loss_enabled, trainer._entropy_bonus_enabled = False, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages,
              "num_items_in_batch": mask.sum() if n_items is None else torch.tensor(n_items)}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if sampling_ratio is not None:
        inputs["importance_sampling_ratio"] = sampling_ratio
    loss = trainer._compute_loss(trainer.model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "entropy"}
    return loss, metrics


def _ours(logps, old, advantages, mask, ref, *, loss_type, level, beta, accum, delta=None, bias_correction=True,
          sampling_ratio=None):
    ga, procs, spg, n_items = accum
    return grpo_loss(logps, old, advantages, mask, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                     delta=delta, beta=beta, ref_per_token_logps=ref, kl_bias_correction=bias_correction,
                     importance_sampling_level=level, max_completion_length=MAX_COMPLETION_LENGTH,
                     num_items_in_batch=n_items, num_processes=procs, gradient_accumulation_steps=ga,
                     steps_per_generation=spg, sampling_ratio=sampling_ratio)


def _compare(loss_type, level, beta, off_policy, accum, **kwargs):
    logps, old, adv, mask, ref = _batch(off_policy, beta)
    if "advantages" in kwargs:
        adv = kwargs.pop("advantages")
    if "old_shift" in kwargs:  # old = policy + shift + noise: every ratio pushed the same way
        noise = 0.15 * torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        old = logps + kwargs.pop("old_shift") + noise
    trl_logps, our_logps = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    trl_loss, trl_metrics = _trl(trl_logps, old, adv, mask, ref, loss_type=loss_type, level=level, beta=beta,
                                 accum=ACCUM[accum], **kwargs)
    ours = _ours(our_logps, old, adv, mask, ref, loss_type=loss_type, level=level, beta=beta, accum=ACCUM[accum],
                 **kwargs)

    assert trl_loss.dtype == ours.loss.dtype == torch.float64
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12, abs=1e-12)
    our_metrics = dict(ours.clip_metrics)
    if beta:
        our_metrics["kl"] = ours.kl_mean.item()
    else:
        assert ours.kl_mean is None
    assert set(our_metrics) == set(trl_metrics)
    for name, value in trl_metrics.items():  # TRL counts clipped tokens in float32
        assert our_metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert reduce_metrics(ours.metric_terms).keys() == trl_metrics.keys()

    trl_loss.backward()
    ours.loss.backward()
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-12, atol=1e-12)
    assert (our_logps.grad[mask == 0] == 0).all()
    return ours, trl_metrics


MATRIX = [(t, level, beta, off) for t in LOSS_TYPES for level in ("token", "sequence") for beta in (0.0, 0.1)
          for off in (False, True)]


@pytest.mark.parametrize("loss_type,level,beta,off_policy", MATRIX,
                         ids=[f"{t}-{lv}-b{b}-{'off' if o else 'on'}" for t, lv, b, o in MATRIX])
def test_matches_trl(loss_type, level, beta, off_policy):
    ours, trl_metrics = _compare(loss_type, level, beta, off_policy, "single")
    if off_policy and loss_type in CLIPPED_LOSS_TYPES:  # the batch does exercise both clip sides
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
    if not off_policy and loss_type in CLIPPED_LOSS_TYPES:
        assert trl_metrics["clip_ratio/region_mean"] == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl_with_accumulation_delta_and_plain_kl(loss_type, level):
    """Gradient accumulation, several processes and steps_per_generation != GA (the normalisers), INTELLECT-2's delta,
    the KL without importance weighting, and per-token [B, T] advantages."""
    _compare(loss_type, level, 0.1, True, "accum")
    _compare(loss_type, level, 0.1, True, "accum", delta=1.3)
    _compare(loss_type, level, 0.05, True, "single", bias_correction=False)
    per_token_adv = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    per_token_adv[:, ::3] = 0.0  # advantage exactly 0: never counted as clipped
    _compare(loss_type, level, 0.0, True, "single", advantages=per_token_adv)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl_when_every_row_clips(level):
    """All advantages of one sign and all ratios pushed the same way, so the per-row min / max clip shares are
    strictly between 0 and 1 and name the right side."""
    neg = -torch.tensor(ADVANTAGES, dtype=torch.float64).abs()
    _, low = _compare("dapo", level, 0.0, True, "single", advantages=neg, old_shift=0.3)  # ratios ~ exp(-0.3) < 0.8
    _, high = _compare("dapo", level, 0.0, True, "single", advantages=-neg, old_shift=-0.3)  # ratios ~ 1.35 > 1.28
    assert low["clip_ratio/high_mean"] == 0 == high["clip_ratio/low_mean"]
    assert low["clip_ratio/high_max"] == 0 == high["clip_ratio/low_min"]
    if level == "token":  # the empty row is NaN and skipped; every other row has some clipped tokens
        assert 0 < low["clip_ratio/low_min"] < 1 and 0 < high["clip_ratio/high_max"] <= 1
    else:  # one value per row; TRL counts the empty row too (ratio exp(0) = 1, never clipped)
        assert low["clip_ratio/low_min"] == 0 and high["clip_ratio/high_max"] == 1
        assert low["clip_ratio/low_mean"] == pytest.approx((B - 1) / B)


@pytest.mark.parametrize("shift", [-3.0, 3.0])
def test_vespo_matches_trl_far_off_policy(shift):
    """Row log-ratio sums beyond VESPO's clamps (log 1e-8 below, 20 above)."""
    ours, metrics = _compare("vespo", "token", 0.0, True, "single", old_shift=shift)
    assert metrics["vespo/phi_seq_mean"] >= 0


SAMPLING = [(t, level, shape) for t in LOSS_TYPES for level in ("token", "sequence") for shape in ("token", "sequence")
            if not (t == "vespo" and shape == "sequence")]  # TRL's VESPO takes per-token ratios only


@pytest.mark.parametrize("loss_type,level,shape", SAMPLING, ids=[f"{t}-{lv}-{sh}" for t, lv, sh in SAMPLING])
def test_sampling_correction_in_the_loss_matches_trl(loss_type, level, shape):
    """vLLM's importance-sampling weights ([B, T] per token or [B, 1] per row) enter each loss as in TRL."""
    weights = torch.rand(B, T if shape == "token" else 1, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(5)) * 2
    _compare(loss_type, level, 0.1, True, "accum", sampling_ratio=weights)


def test_sampling_correction_closed_forms():
    from vlft.train.grpo.loss import sampling_correction

    old = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    sampler = torch.tensor([[-1.5, -2.0, float("nan"), -3.0]], dtype=torch.float64)  # NaN: a token vLLM did not emit
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)  # the last token is not a loss token
    e = math.exp(0.5)
    token = {"token_truncate": [min(e, 1.5), 1.0, 1.0, 1.0], "token_mask": [0.0, 1.0, 1.0, 1.0]}
    for mode, want in token.items():
        got = sampling_correction(old, sampler, mask, mode=mode, clip_max=1.5)
        assert got[0].tolist() == pytest.approx(want)
    assert sampling_correction(old, sampler, mask, mode="sequence_truncate", clip_max=1.5).tolist() == [[1.5]]
    assert sampling_correction(old, sampler, mask, mode="sequence_mask", clip_max=1.5).tolist() == [[0.0]]
    assert sampling_correction(old, sampler, mask, mode="sequence_mask", clip_max=None).tolist() == [[pytest.approx(e)]]
    # a lower bound: truncation raises the ratio to it, masking zeroes it
    low = sampling_correction(-old, -sampler, mask, mode="token_truncate", clip_min=0.9, clip_max=None)
    assert low[0].tolist() == pytest.approx([0.9, 1.0, 1.0, 1.0])
    low = sampling_correction(-old, -sampler, mask, mode="token_mask", clip_min=0.9, clip_max=None)
    assert low[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="mode must be one of"):
        sampling_correction(old, sampler, mask, mode="tokens")


def test_dapo_is_trls_default_and_the_default_here():
    from trl import GRPOConfig

    assert GRPOConfig.__dataclass_fields__["loss_type"].default == "dapo"
    assert GRPOConfig.__dataclass_fields__["scale_rewards"].default == "group"
    assert GRPOConfig.__dataclass_fields__["importance_sampling_level"].default == "token"
    assert GRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default is True
    import inspect
    params = inspect.signature(grpo_loss).parameters
    assert params["loss_type"].default == "dapo" and params["kl_bias_correction"].default is True


# ------------------------------------------------------------------------------------------ closed forms at ratio 1

CF_LENGTHS = [10, 20, 30, 60]
CF_ADV = [1.0, -1.0, 0.5, 2.0]


def _closed_form_batch():
    mask = torch.zeros(4, 60, dtype=torch.long)
    for i, n in enumerate(CF_LENGTHS):
        mask[i, :n] = 1
    logps = -2 * torch.rand(4, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return logps, torch.tensor(CF_ADV, dtype=torch.float64), mask


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_closed_forms_at_ratio_one(level):
    logps, adv, mask = _closed_form_batch()
    A, L = CF_ADV, CF_LENGTHS
    sum_al, sum_l = sum(a * n for a, n in zip(A, L)), sum(L)
    logp_sums = (logps * mask).sum(1).tolist()
    sum_a_logp = sum(a * s for a, s in zip(A, logp_sums))
    # TRL builds the temperatures with torch.where on Python floats, so they are float32: 1.05 -> 1.0499999523...
    tau = [1.0 if a > 0 else torch.tensor(1.05, dtype=torch.float32).item() for a in A]

    def loss(loss_type, **kw):
        out = grpo_loss(logps, None, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                        max_completion_length=64, **kw)
        assert out.kl_mean is None
        if loss_type in CLIPPED_LOSS_TYPES:
            assert out.clip_metrics["clip_ratio/region_mean"] == 0 == out.clip_metrics["clip_ratio/high_max"]
        return out.loss.item()

    assert loss("grpo") == pytest.approx(-sum(A) / 4, rel=1e-12)  # each row: -A_i * (mean over tokens of 1)
    assert loss("bnpo") == pytest.approx(-sum_al / sum_l, rel=1e-12)
    assert loss("dr_grpo") == pytest.approx(-sum_al / (4 * 64), rel=1e-12)
    assert loss("dapo") == pytest.approx(-sum_al / sum_l, rel=1e-12)  # one process, no accumulation: all tokens
    assert loss("luspo") == pytest.approx(-sum_al / 4, rel=1e-12)
    assert loss("sapo") == pytest.approx(-sum(2 / t * a for t, a in zip(tau, A)) / 4, rel=1e-12)  # gate(1) = 2/tau
    assert loss("cispo", epsilon_high=5.0) == pytest.approx(-sum_a_logp / sum_l, rel=1e-12)  # REINFORCE, weight 1
    # cispo's epsilon_high is the cap on the ratio itself: left at the clip default 0.2, every weight is 0.2
    assert loss("cispo") == pytest.approx(-0.2 * sum_a_logp / sum_l, rel=1e-12)
    assert loss("vespo") == pytest.approx(-sum_a_logp / sum_l, rel=1e-12)  # phi(1) = 1
    # accumulation: 400 tokens in the generation batch over 2 processes, 2 accumulation steps, 4 micro-batches per
    # generation -> each micro-batch divides by 400 / 2 * 2 / 4 = 100 tokens; the others divide by GA
    assert loss("dapo", num_items_in_batch=400, num_processes=2, gradient_accumulation_steps=2,
                steps_per_generation=4) == pytest.approx(-sum_al / 100, rel=1e-12)
    assert loss("dapo", num_items_in_batch=400, num_processes=2,
                gradient_accumulation_steps=2) == pytest.approx(-sum_al / 200, rel=1e-12)
    assert loss("grpo", gradient_accumulation_steps=2) == pytest.approx(-sum(A) / 8, rel=1e-12)
    assert loss("bnpo", gradient_accumulation_steps=4) == pytest.approx(-sum_al / sum_l / 4, rel=1e-12)


# --------------------------------------------------------------------------- gradient against a plain formula

def _plain_loss(logps, old, ref, adv, lengths, loss_type, level, beta, max_len=None):
    """The GRPO objective written out token by token: the surrogate is r*A unless the ratio has left the trust region
    in the direction the advantage pushes it, where it is the constant clip(r)*A; KL is k3 times the ratio."""
    rows, total = [], 0.0
    for i, n in enumerate(lengths):
        a = float(adv[i])
        if level == "sequence" and n:
            seq_r = torch.exp(sum(logps[i, t] - old[i, t] for t in range(n)) / max(n, 1))
        row = 0.0
        for t in range(n):
            r = torch.exp(logps[i, t] - old[i, t]) if level == "token" else seq_r
            outside = (a > 0 and r.item() > 1 + EPS_HIGH) or (a < 0 and r.item() < 1 - EPS_LOW)
            surrogate = torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH).detach() * a if outside else r * a
            d = ref[i, t] - logps[i, t]
            row = row - surrogate + beta * (torch.exp(d) - d - 1) * r
        rows.append(row)
        total = total + row
    n_tokens = sum(lengths)
    if loss_type == "grpo":
        return sum(row / max(n, 1) for row, n in zip(rows, lengths)) / len(lengths)
    if loss_type in ("bnpo", "dapo"):
        return total / n_tokens
    return total / (len(lengths) * max_len)  # dr_grpo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_gradient_matches_plain_formula(loss_type, level, beta):
    logps, old, adv, mask, ref = _batch(True, 0.1)
    ours_in, plain_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    out = grpo_loss(ours_in, old, adv, mask, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                    beta=beta, ref_per_token_logps=ref, importance_sampling_level=level,
                    max_completion_length=MAX_COMPLETION_LENGTH)
    plain = _plain_loss(plain_in, old, ref, adv, LENGTHS, loss_type, level, beta, MAX_COMPLETION_LENGTH)
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-10)
    out.loss.backward()
    plain.backward()
    torch.testing.assert_close(ours_in.grad, plain_in.grad, rtol=1e-10, atol=1e-12)
    assert ours_in.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_clipped_tokens_get_no_gradient(loss_type):
    """Token level, beta 0: per row, tokens pushed past the clip bound in the advantage's direction get zero gradient;
    tokens outside the range on the other side, and tokens inside it, keep theirs."""
    log_r = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 0.0],  # A > 0: clipped, kept, kept, kept
                          [math.log(0.5), math.log(1.5), math.log(0.9), 0.0]], dtype=torch.float64)  # A < 0
    old = -torch.ones(2, 4, dtype=torch.float64)
    logps = (old + log_r).requires_grad_()
    out = grpo_loss(logps, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 4),
                    loss_type=loss_type, max_completion_length=4)
    out.loss.backward()
    grad = logps.grad
    assert grad[0, 0] == 0 and grad[1, 0] == 0
    assert (grad[:, 1:] != 0).all()
    assert (grad[0, 1:] < 0).all() and (grad[1, 1:] > 0).all()  # descent raises A>0 tokens, lowers A<0 ones
    assert out.clip_metrics["clip_ratio/high_mean"] == pytest.approx(1 / 8)
    assert out.clip_metrics["clip_ratio/low_mean"] == pytest.approx(1 / 8)
    assert out.clip_metrics["clip_ratio/region_mean"] == pytest.approx(2 / 8)
    assert out.clip_metrics["clip_ratio/low_min"] == 0 and out.clip_metrics["clip_ratio/high_max"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_first_pass_of_a_kept_rollout_is_the_pass_against_its_own_log_probs(loss_type, level):
    """--num_iterations > 1 as the trainer runs it: the first pass over a rollout passes old=None and its detached
    log-probs become old_per_token_logps of the later passes. That first pass is the pass with old = those very
    log-probs (loss, gradient, metrics bit for bit); the later passes, old != current, are the plain clipped formula
    (test_gradient_matches_plain_formula) and TRL's (test_matches_trl, off-policy)."""
    logps, _, adv, mask, ref = _batch(False, 0.1)
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                  beta=0.1, ref_per_token_logps=ref, max_completion_length=MAX_COMPLETION_LENGTH,
                  gradient_accumulation_steps=1, steps_per_generation=1)  # the trainer's per-micro-batch call
    first_in, explicit_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    first = grpo_loss(first_in, None, adv, mask, **kwargs)
    explicit = grpo_loss(explicit_in, first_in.detach().clone(), adv, mask, **kwargs)
    assert first.loss.item() == explicit.loss.item() and first.kl_mean.item() == explicit.kl_mean.item()
    assert first.clip_metrics == explicit.clip_metrics
    first.loss.backward()
    explicit.loss.backward()
    assert torch.equal(first_in.grad, explicit_in.grad) and first_in.grad.abs().sum() > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_is_zero_at_the_reference(loss_type, level):
    logps, old, adv, mask, _ = _batch(True, 0.0)
    with_kl = grpo_loss(logps, old, adv, mask, loss_type=loss_type, beta=0.5, ref_per_token_logps=logps.clone(),
                        importance_sampling_level=level, max_completion_length=MAX_COMPLETION_LENGTH)
    without = grpo_loss(logps, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                        max_completion_length=MAX_COMPLETION_LENGTH)
    assert with_kl.kl_mean.item() == 0.0
    assert with_kl.loss.item() == pytest.approx(without.loss.item(), rel=1e-12, abs=1e-15)
    moved = grpo_loss(logps, old, adv, mask, loss_type=loss_type, beta=0.5, ref_per_token_logps=logps + 0.2,
                      importance_sampling_level=level, max_completion_length=MAX_COMPLETION_LENGTH)
    assert moved.kl_mean.item() > 0


def test_loss_refuses_bad_arguments():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss type"):
        grpo_loss(x, None, a, m, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(x, None, a, m, importance_sampling_level="row")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(x, None, a, m, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(x, None, a, m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo_loss(x, None, a, m[:, :2])


def test_reduce_metrics_across_processes():
    """Two processes: means pool the token counts, min/max range over both processes' rows, NaN rows skipped."""
    terms = {"clip_ratio/low_mean": torch.tensor([1.0, 4.0]), "clip_ratio/low_min": torch.tensor([0.5, float("nan")])}
    other = {"clip_ratio/low_mean": torch.tensor([2.0, 8.0]), "clip_ratio/low_min": torch.tensor([0.25, 1.0])}
    out = reduce_metrics(terms, all_reduce_sum=lambda x: x + other["clip_ratio/low_mean"],
                         all_gather=lambda x: torch.cat([x, other["clip_ratio/low_min"]]))
    assert out == {"clip_ratio/low_mean": pytest.approx(3 / 12), "clip_ratio/low_min": 0.25}


# -------------------------------------------------------------------------------------- advantages and rewards

def test_group_advantages_by_hand():
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert std == pytest.approx(0.57735, abs=1e-5)
    expected = 0.5 / (std + 1e-4)
    assert expected == pytest.approx(0.86588, abs=1e-5)
    torch.testing.assert_close(adv, torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0]))
    assert zero.tolist() == [False] * 4 + [True] * 4


def test_group_advantages_scalings_and_aliases():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 4.0, 4.0], dtype=torch.float64)
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    none, zero_none = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(none, centred)
    batch, zero_batch = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, centred / (rewards.std() + 1e-4))
    group, _ = group_advantages(rewards, 4, "group")
    torch.testing.assert_close(group[4:], centred[4:] / (rewards[4:].std() + 1e-4))
    assert not zero_none.any() and not zero_batch.any()
    torch.testing.assert_close(group_advantages(rewards, 4, True)[0], group)
    torch.testing.assert_close(group_advantages(rewards, 4, False)[0], none)
    assert resolve_scale_rewards(True) == "group" and resolve_scale_rewards(False) == "none"
    assert [resolve_scale_rewards(s) for s in SCALE_REWARDS] == list(SCALE_REWARDS)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 4, "global")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(rewards, 3)
    # one generation per prompt: no spread, no signal
    adv, zero = group_advantages(rewards, 1)
    assert (adv == 0).all() and zero.all()


def test_all_equal_groups_have_zero_std():
    rewards = torch.full((6,), 0.7)
    adv, zero = group_advantages(rewards, 3)
    assert (adv == 0).all() and zero.all()
    per_func = rewards.unsqueeze(1)
    assert reward_stats(per_func, ["acc"], rewards, 3)["frac_reward_zero_std"] == 1.0
    assert reward_stats(per_func, ["acc"], rewards, 3, "batch")["frac_reward_zero_std"] == 1.0


def test_none_rewards_are_left_out():
    nan = float("nan")
    # 2 prompts x 3 generations, two reward functions; "fmt" returned None for some completions, and completion 5
    # got None from both (unscorable)
    per_func = torch.tensor([[1.0, 0.5], [0.0, nan], [1.0, 1.0], [0.0, nan], [1.0, 0.0], [nan, nan]])
    weights = torch.tensor([1.0, 2.0])
    rewards = weighted_rewards(per_func, weights)
    assert rewards[:5].tolist() == [2.0, 0.0, 3.0, 0.0, 1.0]  # None contributes 0 to a scorable completion
    assert math.isnan(rewards[5])
    adv, zero = group_advantages(rewards, 3)
    assert adv[5] == 0 and not zero[5]
    second = torch.tensor([0.0, 1.0])  # group 2's baseline and std use completions 3 and 4 only
    torch.testing.assert_close(adv[3:5], (second - 0.5) / (second.std() + 1e-4))
    stats = reward_stats(per_func, ["acc", "fmt"], rewards, 3)
    assert stats["rewards/acc/mean"] == pytest.approx(3 / 5)
    assert stats["rewards/fmt/mean"] == pytest.approx(1.5 / 3)  # three completions scored, not six
    assert stats["rewards/fmt/std"] == pytest.approx(torch.tensor([0.5, 1.0, 0.0]).std().item())
    assert stats["reward"] == pytest.approx(6 / 5)
    assert stats["reward_std"] == pytest.approx(rewards[:5].std().item())
    assert stats["frac_reward_zero_std"] == 0.0
    assert set(stats) == {"rewards/acc/mean", "rewards/acc/std", "rewards/fmt/mean", "rewards/fmt/std", "reward",
                          "reward_std", "frac_reward_zero_std"}


def test_nanstd_is_trls():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    x[0, 1] = x[2, 0] = x[2, 3] = x[5, :3] = float("nan")
    torch.testing.assert_close(_nanstd(x, dim=1), trl_nanstd(x, dim=1), equal_nan=True)
    torch.testing.assert_close(_nanstd(x), trl_nanstd(x))
    torch.testing.assert_close(_nanstd(x, dim=0), trl_nanstd(x, dim=0), equal_nan=True)
