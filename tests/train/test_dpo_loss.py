"""vlft/train/dpo/loss.py against its oracle, TRL 1.16's own `DPOTrainer._compute_loss`: on the same fixed per-token
log-probs, every loss type (alone, with LD-DPO weighting, and combined as in RPO) gives the same loss, the same
gradient and the same logged reward metrics. Plus closed forms at policy == reference and the config checks."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer

from vlft.train.dpo.loss import LOSS_TYPES, check_loss_config, preference_loss, reward_metrics, sequence_logps

B, T = 3, 14
# (prompt length, chosen length, rejected length) per pair. The last pair has no prompt, so its first completion
# token is never predicted: the unshifted and shifted masks then count different lengths (ipo, sigmoid_norm).
PAIRS = [(4, 1, 6), (2, 9, 11), (0, 5, 7)]
# label smoothing where the loss type reads it
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.05}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _batch():
    """Inputs as TRL's collator lays them out ([chosen rows; rejected rows], right-padded) and the policy's raw
    per-token log-probs [2B, T-1], non-zero everywhere (also off the completion)."""
    gen = torch.Generator().manual_seed(0)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    attention_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        for row, length in ((i, chosen), (B + i, rejected)):
            completion_mask[row, prompt:prompt + length] = 1
            attention_mask[row, :prompt + length] = 1
    input_ids = torch.randint(0, 100, (2 * B, T), generator=gen)
    raw_logps = -3 * torch.rand(2 * B, T - 1, generator=gen, dtype=torch.float64)
    seq = (raw_logps * completion_mask[:, 1:]).sum(1)
    ref = seq.detach() + 2 * torch.randn(2 * B, generator=gen, dtype=torch.float64)  # policy moved off the ref
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return inputs, raw_logps


class _FusedHeadStub(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: fixed log-probs, zero where the next label is -100."""

    def __init__(self, raw_logps):
        super().__init__()
        self.raw_logps = raw_logps
        gen = torch.Generator().manual_seed(1)
        self.entropy = torch.rand(raw_logps.shape, generator=gen, dtype=torch.float64)
        self.mean_logits = torch.randn(raw_logps.shape, generator=gen, dtype=torch.float64)
        self.is_top1 = torch.rand(raw_logps.shape, generator=gen) > 0.5

    def forward(self, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        keep = labels[:, 1:] != -100
        return SimpleNamespace(log_probs=self.raw_logps * keep, entropy=self.entropy * keep,
                               mean_logits=self.mean_logits * keep, is_top1=self.is_top1 & keep)


def _trl(inputs, raw_logps, loss_types, weights, beta, label_smoothing, ld_alpha):
    """TRL's loss and logged metrics, from a DPOTrainer built bare with only what `_compute_loss` reads."""
    trainer = object.__new__(DPOTrainer)
    model = _FusedHeadStub(raw_logps)
    trainer.model = model
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                          gather=lambda x: x, unwrap_model=lambda m: m)
    trainer.args = SimpleNamespace(discopop_tau=0.05)
    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, list(loss_types), weights or [1.0] * len(loss_types)
    trainer.ld_alpha, trainer.label_smoothing = ld_alpha, label_smoothing
    trainer.f_divergence_type, trainer.use_weighting = "reverse_kl", False
    trainer.precompute_ref_logps, trainer.aux_loss_enabled = True, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(inputs, raw_logps, loss_types, weights, beta, label_smoothing, ld_alpha):
    shifted = inputs["completion_mask"][:, 1:]
    logps = sequence_logps(raw_logps, shifted, ld_alpha=ld_alpha)
    out = preference_loss(*logps.chunk(2), inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                          loss_type=loss_types, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
                          completion_lengths=inputs["completion_mask"].sum(1), per_token_logps=raw_logps,
                          completion_mask=shifted)
    metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, *logps.chunk(2))
    return out, {k: v.mean().item() for k, v in metrics.items()}


CASES = ([([t], None, 0.1, SMOOTHING.get(t, 0.0), None) for t in LOSS_TYPES]
         + [([t], None, 0.5, SMOOTHING.get(t, 0.0), 0.5) for t in ("sigmoid", "ipo", "sigmoid_norm", "aot", "sft")]
         + [(["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0, None),  # RPO
            (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, 0.0, None),  # MPO
            (["hinge", "apo_zero"], [0.3, 2.0], 0.5, 0.0, 0.5)])


@pytest.mark.parametrize("loss_types,weights,beta,label_smoothing,ld_alpha", CASES,
                         ids=["+".join(c[0]) + ("-ld" if c[4] is not None else "") + f"-b{c[2]}" for c in CASES])
def test_matches_trl(loss_types, weights, beta, label_smoothing, ld_alpha):
    inputs, raw = _batch()
    raw_trl, raw_ours = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    trl_loss, trl_metrics = _trl(inputs, raw_trl, loss_types, weights, beta, label_smoothing, ld_alpha)
    ours, our_metrics = _ours(inputs, raw_ours, loss_types, weights, beta, label_smoothing, ld_alpha)

    assert trl_loss.dtype == ours.loss.dtype == torch.float64
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12, abs=1e-12)
    assert ours.per_pair.shape == (B,)
    assert ours.per_pair.mean().item() == pytest.approx(ours.loss.item(), rel=1e-12, abs=1e-12)
    for name in METRICS:
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-12, abs=1e-12), name

    trl_loss.backward()
    ours.loss.backward()
    # gradients only reach completion tokens, and reach them identically
    torch.testing.assert_close(raw_ours.grad, raw_trl.grad, rtol=1e-12, atol=1e-12)
    assert raw_ours.grad.abs().sum() > 0
    assert (raw_ours.grad[inputs["completion_mask"][:, 1:] == 0] == 0).all()


def test_batch_is_discriminating():
    """The fixed batch separates the variants the comparison above relies on, so a wrong choice there would fail."""
    inputs, raw = _batch()
    mask = inputs["completion_mask"]
    shifted = mask[:, 1:]
    assert not torch.equal(mask.sum(1), shifted.sum(1))  # unshifted vs shifted lengths
    assert not torch.allclose(sequence_logps(raw, shifted, 0.5), sequence_logps(raw, shifted))  # LD-DPO matters
    assert not torch.allclose(sequence_logps(raw, shifted), raw.sum(1))  # masking matters
    for loss_type in ("ipo", "sigmoid_norm"):
        ours, _ = _ours(inputs, raw, [loss_type], None, 0.1, 0.0, None)
        logps = sequence_logps(raw, shifted).chunk(2)
        wrong = preference_loss(*logps, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], loss_type=[loss_type],
                                completion_lengths=shifted.sum(1))
        assert abs(wrong.loss.item() - ours.loss.item()) > 1e-6


def test_sequence_logps_ld_alpha_by_hand():
    per_token = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 10.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])  # chosen has 3 completion tokens, rejected 1
    assert sequence_logps(per_token, mask).tolist() == [6.0, 10.0]
    assert sequence_logps(per_token, mask, ld_alpha=0.5).tolist() == [1.0 + 0.5 * (2.0 + 3.0), 10.0]
    assert sequence_logps(per_token, mask, ld_alpha=0.0).tolist() == [1.0, 10.0]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_closed_forms_at_reference(beta):
    logps = torch.tensor([-12.0, -3.5, -40.0], dtype=torch.float64)
    lengths = torch.tensor([4, 7, 2, 5, 1, 9])

    def loss(loss_type):
        return preference_loss(logps, logps - 1.0, logps, logps - 1.0, loss_type=[loss_type], beta=beta,
                               completion_lengths=lengths)

    expected = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * beta**2), "bco_pair": 2 * math.log(2),
                "sppo_hard": 1 / (2 * beta**2), "apo_zero": 1.0, "sigmoid_norm": math.log(2)}
    for loss_type, value in expected.items():
        out = loss(loss_type)
        assert out.loss.item() == pytest.approx(value, rel=1e-12), loss_type
        torch.testing.assert_close(out.per_pair, torch.full((3,), value, dtype=torch.float64))
    out = loss("sigmoid")
    metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, logps, logps - 1.0)
    assert metrics["rewards/margins"].abs().max() == 0
    assert metrics["rewards/accuracies"].sum() == 0
    assert metrics["rewards/chosen"].abs().max() == 0


def test_preference_loss_names_missing_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="completion_lengths"):
        preference_loss(x, x, x, x, loss_type=["sigmoid", "ipo"])
    with pytest.raises(ValueError, match="per_token_logps"):
        preference_loss(x, x, x, x, loss_type=["sft"])
    with pytest.raises(ValueError, match="unknown loss type"):
        preference_loss(x, x, x, x, loss_type=["dpo"])
    with pytest.raises(ValueError, match="one weight per loss type"):
        preference_loss(x, x, x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])


def test_loss_types_are_trls():
    with pytest.raises(ValueError) as err:
        _trl(*_batch(), ["no_such_loss"], None, 0.1, 0.0, None)
    trl_types = {t.strip(" '[]") for t in str(err.value).split("one of", 1)[1].split(",")}
    assert trl_types == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type,weights,beta,label_smoothing,flag,hint", [
    (["dpo"], None, 0.1, 0.0, "--loss_type", "sigmoid_norm"),
    (["sigmoid", "sigmoid"], None, 0.1, 0.0, "--loss_type", "more than once"),
    ([], None, 0.1, 0.0, "--loss_type", "empty"),
    (["sigmoid", "sft"], [1.0], 0.1, 0.0, "--loss_weights", "1 values for 2"),
    (["sigmoid"], None, 0.0, 0.0, "--beta", "> 0"),
    (["sigmoid"], None, -0.1, 0.0, "--beta", "> 0"),
    (["robust"], None, 0.1, 0.5, "--label_smoothing", "[0, 0.5)"),
    (["robust"], None, 0.1, -0.1, "--label_smoothing", "[0, 0.5)"),
    (["exo_pair"], None, 0.1, 0.0, "--label_smoothing", "1e-3"),
])
def test_check_loss_config_refuses(loss_type, weights, beta, label_smoothing, flag, hint):
    problems = check_loss_config(loss_type, weights, beta, label_smoothing)
    assert len(problems) == 1, problems
    assert flag in problems[0] and hint in problems[0]


@pytest.mark.parametrize("loss_type,weights,beta,label_smoothing", [
    (["sigmoid"], None, 0.1, 0.0),
    (["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0),
    (["robust"], None, 0.1, 0.1),
    (["exo_pair"], None, 0.1, 1e-3),
    (list(LOSS_TYPES), [1.0] * len(LOSS_TYPES), 0.5, 1e-3),
])
def test_check_loss_config_accepts(loss_type, weights, beta, label_smoothing):
    assert check_loss_config(loss_type, weights, beta, label_smoothing) == []
