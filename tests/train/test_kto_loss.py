"""vlft/train/kto/loss.py against its oracle, TRL 1.16's own `KTOTrainer._compute_loss`: on the same fixed per-token
log-probs (answer rows and KL rows), both loss types, default and other weights, give the same loss, gradient and
logged metrics. Plus the closed form at policy == reference, the KL estimate's clamp and gather, and the flag checks."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import KTOTrainer

from vlft.train.kto.loss import LOSS_TYPES, check_loss_config, kl_estimate, kto_loss, kto_metrics

T = 12
# (prompt length, answer length, KL answer length, label) per record: both labels, a prompt-less row
RECORDS = [(4, 3, 5, True), (2, 7, 2, False), (0, 5, 6, True), (3, 2, 4, False), (5, 6, 3, False)]
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _rows(lengths, gen):
    completion_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (prompt, answer) in enumerate(lengths):
        completion_mask[i, prompt:prompt + answer] = 1
        attention_mask[i, :prompt + answer] = 1
    return torch.randint(0, 100, (len(lengths), T), generator=gen), attention_mask, completion_mask


def _batch(kl_shift: float):
    """TRL's collated layout (answer rows, KL rows) and raw per-token log-probs [B, T-1] of each, non-zero
    everywhere; the reference is the policy moved by noise, the KL rows' by `kl_shift` nats on average."""
    gen = torch.Generator().manual_seed(0)
    ids, attention, mask = _rows([(p, a) for p, a, _, _ in RECORDS], gen)
    kl_ids, kl_attention, kl_mask = _rows([(p, k) for p, _, k, _ in RECORDS], gen)
    raw = -3 * torch.rand(len(RECORDS), T - 1, generator=gen, dtype=torch.float64)
    kl_raw = -3 * torch.rand(len(RECORDS), T - 1, generator=gen, dtype=torch.float64)
    ref = (raw * mask[:, 1:]).sum(1) + 2 * torch.randn(len(RECORDS), generator=gen, dtype=torch.float64)
    ref_kl = (kl_raw * kl_mask[:, 1:]).sum(1) - kl_shift + 0.5 * torch.randn(len(RECORDS), generator=gen,
                                                                             dtype=torch.float64)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": mask, "KL_input_ids": kl_ids,
              "KL_attention_mask": kl_attention, "KL_completion_mask": kl_mask,
              "label": torch.tensor([label for *_, label in RECORDS]), "ref_logps": ref, "ref_KL_logps": ref_kl}
    return inputs, raw, kl_raw


class _FusedHeadStub(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: fixed log-probs (answer rows or KL rows, told apart by their
    ids), zero where the next label is -100."""

    def __init__(self, inputs, raw, kl_raw):
        super().__init__()
        self.rows = {"answer": (inputs["input_ids"], raw), "kl": (inputs["KL_input_ids"], kl_raw)}
        gen = torch.Generator().manual_seed(1)
        self.entropy = torch.rand(raw.shape, generator=gen, dtype=torch.float64)
        self.mean_logits = torch.randn(raw.shape, generator=gen, dtype=torch.float64)

    def forward(self, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        (raw,) = [raw for ids, raw in self.rows.values() if torch.equal(ids, input_ids)]
        keep = labels[:, 1:] != -100
        return SimpleNamespace(log_probs=raw * keep, entropy=self.entropy * keep, mean_logits=self.mean_logits * keep)


def _trl(inputs, raw, kl_raw, loss_type, beta, desirable_weight, undesirable_weight):
    """TRL's loss and logged metrics, from a KTOTrainer built bare with only what `_compute_loss` reads."""
    trainer = object.__new__(KTOTrainer)
    model = _FusedHeadStub(inputs, raw, kl_raw)
    trainer.model = model
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer.beta, trainer.loss_type = beta, loss_type
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    trainer.calculate_KL = loss_type != "apo_zero_unpaired"  # TRL's own rule (KTOTrainer.__init__)
    trainer.precompute_ref_logps, trainer.aux_loss_enabled = True, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(inputs, raw, kl_raw, loss_type, beta, desirable_weight, undesirable_weight):
    logps = (raw * inputs["completion_mask"][:, 1:]).sum(1)
    kl_logps = (kl_raw * inputs["KL_completion_mask"][:, 1:]).sum(1)
    labels = inputs["label"]
    kl = kl_estimate(kl_logps, inputs["ref_KL_logps"])
    out = kto_loss(logps, inputs["ref_logps"], labels, kl, loss_type=loss_type, beta=beta,
                   desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    return out, kto_metrics(out.rewards, logps, labels, kl)


CASES = [(t, beta, dw, uw, shift) for t in LOSS_TYPES
         for beta, dw, uw, shift in ((0.1, 1.0, 1.0, 1.5), (0.5, 1.33, 0.7, 1.5), (0.1, 1.0, 1.0, -1.5))]


@pytest.mark.parametrize("loss_type,beta,desirable_weight,undesirable_weight,kl_shift", CASES,
                         ids=[f"{c[0]}-b{c[1]}-w{c[2]}/{c[3]}-kl{c[4]:+}" for c in CASES])
def test_matches_trl(loss_type, beta, desirable_weight, undesirable_weight, kl_shift):
    inputs, raw, kl_raw = _batch(kl_shift)
    raw_trl, raw_ours = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    kl_trl, kl_ours = kl_raw.clone().requires_grad_(), kl_raw.clone().requires_grad_()
    flags = (loss_type, beta, desirable_weight, undesirable_weight)
    trl_loss, trl_metrics = _trl(inputs, raw_trl, kl_trl, *flags)
    ours, our_metrics = _ours(inputs, raw_ours, kl_ours, *flags)

    assert trl_loss.dtype == ours.loss.dtype == torch.float64
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12, abs=1e-12)
    assert ours.losses.shape == (len(RECORDS),)
    for name in METRICS:
        if name == "kl" and loss_type == "apo_zero_unpaired":
            continue  # TRL computes no KL there and logs 0; vlft logs the estimate (the loss does not read it)
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-12, abs=1e-12), name

    trl_loss.backward()
    ours.loss.backward()
    torch.testing.assert_close(raw_ours.grad, raw_trl.grad, rtol=1e-12, atol=1e-12)
    assert raw_ours.grad.abs().sum() > 0
    assert (raw_ours.grad[inputs["completion_mask"][:, 1:] == 0] == 0).all()
    # the KL rows only set the detached reference point: no gradient reaches them, in TRL or here
    assert kl_ours.grad is None and kl_trl.grad is None


def test_batch_is_discriminating():
    """The fixed batch separates what the comparison relies on: the KL term matters (and is clamped at 0 on the
    other shift), the weights and the labels matter."""
    for shift in (1.5, -1.5):
        inputs, raw, kl_raw = _batch(shift)
        kl = kl_estimate((kl_raw * inputs["KL_completion_mask"][:, 1:]).sum(1), inputs["ref_KL_logps"])
        assert (kl.item() > 0.5) if shift > 0 else (kl.item() == 0)
    inputs, raw, kl_raw = _batch(1.5)
    base, _ = _ours(inputs, raw, kl_raw, "kto", 0.5, 1.33, 0.7)
    no_kl = kto_loss((raw * inputs["completion_mask"][:, 1:]).sum(1), inputs["ref_logps"],
                     inputs["label"], 0.0, beta=0.5, desirable_weight=1.33, undesirable_weight=0.7)
    assert abs(no_kl.loss.item() - base.loss.item()) > 1e-4
    flipped = dict(inputs, label=~inputs["label"])
    assert abs(_ours(flipped, raw, kl_raw, "kto", 0.5, 1.33, 0.7)[0].loss.item() - base.loss.item()) > 1e-4
    same_weights, _ = _ours(inputs, raw, kl_raw, "kto", 0.5, 1.0, 1.0)
    assert abs(same_weights.loss.item() - base.loss.item()) > 1e-4


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,desirable_weight,undesirable_weight", [(0.1, 1.0, 1.0), (2.0, 1.33, 0.5)])
def test_closed_form_at_reference(loss_type, beta, desirable_weight, undesirable_weight):
    """Policy == reference: every log-ratio and the KL are 0, so each record's loss is its weight x 1/2."""
    logps = torch.tensor([-12.0, -3.5, -40.0, -7.25], dtype=torch.float64)
    labels = torch.tensor([True, False, False, True])
    kl = kl_estimate(logps - 1.0, logps - 1.0)
    out = kto_loss(logps, logps, labels, kl, loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight)
    weights = [desirable_weight if label else undesirable_weight for label in labels.tolist()]
    torch.testing.assert_close(out.losses, 0.5 * torch.tensor(weights, dtype=torch.float64))
    assert out.loss.item() == pytest.approx(0.5 * sum(weights) / len(weights), rel=1e-12)
    metrics = kto_metrics(out.rewards, logps, labels, kl)
    assert metrics["kl"] == 0 and metrics["rewards/chosen"] == metrics["rewards/rejected"] == 0
    assert metrics["rewards/margins"] == 0
    assert metrics["logps/chosen"] == pytest.approx((-12.0 - 7.25) / 2)


def test_kl_estimate_gathers_then_clamps():
    """Under several processes the KL is the mean of every process's mean, clamped after the mean (TRL)."""
    mine = torch.tensor([1.0, 3.0], requires_grad=True)
    other_mean = torch.tensor(-4.0)
    kl = kl_estimate(mine, torch.zeros(2), gather=lambda x: torch.stack([x, other_mean]))
    assert kl.item() == 0 and not kl.requires_grad  # (2 - 4) / 2 < 0 -> 0; a per-process clamp would give 1
    kl = kl_estimate(mine, torch.zeros(2), gather=lambda x: torch.stack([x, torch.tensor(1.0)]))
    assert kl.item() == pytest.approx(1.5)


def test_metrics_gather_counts_across_processes():
    """rewards/chosen is the sum over all processes' desirable records / their count (TRL), and a process without
    desirable records still takes part in the gather."""
    rewards = torch.tensor([0.5, -1.0])
    labels = torch.tensor([False, False])
    other = torch.tensor([3.0, -10.0, 2.0, 0.0, 0.0, 0.0])  # another process: 2 desirable records, rewards sum 3
    metrics = kto_metrics(rewards, torch.tensor([-5.0, -6.0]), labels, torch.tensor(0.2),
                          gather=lambda x: torch.cat([x, other]))
    assert metrics["rewards/chosen"] == pytest.approx(1.5) and metrics["logps/chosen"] == pytest.approx(-5.0)
    assert metrics["rewards/rejected"] == pytest.approx(-0.25)
    assert metrics["rewards/margins"] == pytest.approx(1.75)
    alone = kto_metrics(rewards, torch.tensor([-5.0, -6.0]), labels, torch.tensor(0.2))
    assert "rewards/chosen" not in alone and "rewards/margins" not in alone


def test_loss_types_are_trls():
    import inspect

    source = inspect.getsource(KTOTrainer._compute_loss)
    assert all(f'self.loss_type == "{t}"' in source for t in LOSS_TYPES)
    with pytest.raises(ValueError, match="unknown KTO loss type"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), 0.0, loss_type="sigmoid")


@pytest.mark.parametrize("loss_type,beta,dw,uw,flag", [
    ("sigmoid", 0.1, 1.0, 1.0, "--loss_type 'sigmoid'"),
    ("kto", 0.0, 1.0, 1.0, "--beta must be > 0"),
    ("kto", 0.1, 0.0, 1.0, "--desirable_weight must be > 0"),
    ("apo_zero_unpaired", 0.1, 1.0, -1.0, "--undesirable_weight must be > 0"),
])
def test_check_loss_config_names_the_flag(loss_type, beta, dw, uw, flag):
    problems = check_loss_config(loss_type, beta, dw, uw)
    assert len(problems) == 1 and problems[0].startswith(flag), problems
    assert check_loss_config("kto", 0.1, 1.0, 1.0) == []
