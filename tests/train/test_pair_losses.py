"""The pair stage's reference-free losses (train/dpo/loss.py `reference_free_loss`: cpo, cpo_hinge, cpo_ipo, simpo,
orpo) against their oracles, TRL 1.16's own trainer methods: `CPOTrainer.get_batch_loss_metrics` and
`ORPOTrainer.get_batch_loss_metrics` (each with its `concatenated_forward`, `get_batch_logps`, `cpo_loss` /
`odds_ratio_loss`) run on a stub trainer whose model returns fixed logits. vlft gets the per-token log-probs of
the same logits and must give the same loss, the same gradient with respect to the logits and the same logged
metrics. Plus the config rules of these losses (DPOConfig.problems)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the oracles live in trl.experimental
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from vlft.train.dpo.loss import REFERENCE_FREE, check_loss_config, needs_reference, reference_free_loss  # noqa: E402

B, T, V = 3, 14, 11
PAD = 0
# (prompt length, chosen length, rejected length) per pair; every row padded to T on the right
WITH_PROMPT = [(4, 2, 6), (2, 9, 11), (5, 5, 3)]
NO_PROMPT = [(0, 3, 6), (0, 9, 12), (0, 5, 2)]  # TRL's ORPO NLL (prompt + answer) is then the answer's
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss")
ORPO_METRICS = ("log_odds_ratio", "log_odds_chosen")


def _batch(pairs, seed=0):
    """TRL's tokenised pair batch (`chosen_*` / `rejected_*` input ids, attention masks, labels with -100 on the
    prompt and the padding) and fixed logits [2B, T, V] for its concatenated rows [chosen; rejected]."""
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for side, col in (("chosen", 1), ("rejected", 2)):
        ids = torch.randint(1, V, (B, T), generator=gen)
        attention = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100)
        for i, pair in enumerate(pairs):
            prompt, length = pair[0], pair[col]
            attention[i, :prompt + length] = 1
            labels[i, prompt:prompt + length] = ids[i, prompt:prompt + length]
            ids[i, prompt + length:] = PAD
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    logits = 3 * torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    return batch, logits


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def _stub(cls, **attrs):
    """A bare TRL trainer holding only what `get_batch_loss_metrics` reads."""
    trainer = object.__new__(cls)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer.is_encoder_decoder, trainer.aux_loss_enabled = False, False
    trainer.pad_token_id = trainer.padding_value = PAD
    for name, value in attrs.items():
        setattr(trainer, name, value)
    return trainer


def trl_loss(loss_type, batch, logits, *, beta, label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0):
    """(loss, d loss / d logits, metrics) from TRL's CPOTrainer or ORPOTrainer."""
    logits = logits.clone().requires_grad_(True)
    trainer_cls, trl_type = REFERENCE_FREE[loss_type]
    if trainer_cls == "ORPOTrainer":
        trainer = _stub(ORPOTrainer, beta=beta)
    else:
        trainer = _stub(CPOTrainer, beta=beta, loss_type=trl_type, label_smoothing=label_smoothing,
                        simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, alpha=0.0)
    loss, metrics = trainer.get_batch_loss_metrics(_FixedLogits(logits), batch)
    loss.backward()
    return loss.detach(), logits.grad, metrics


def vlft_loss(loss_type, batch, logits, **kwargs):
    """(loss, d loss / d logits, metrics as the DPO trainer logs them) from vlft's per-token log-probs of the same
    logits: [chosen; rejected] rows, the mask shifted (1 where the next token is an answer token)."""
    logits = logits.clone().requires_grad_(True)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    mask = (labels != -100).long()
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    out = reference_free_loss(per_token, mask, loss_type=loss_type, **kwargs)
    out.loss.backward()
    metrics = {"rewards/chosen": out.chosen_rewards.mean(), "rewards/rejected": out.rejected_rewards.mean(),
               "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).double().mean(),
               "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
               "logps/chosen": out.chosen_logps.detach().mean(), "logps/rejected": out.rejected_logps.detach().mean(),
               "nll_loss": out.nll, **out.extra}
    return out.loss.detach(), logits.grad, {k: float(v) for k, v in metrics.items()}


CASES = [
    ("cpo", dict(beta=0.1)),  # TRL's CPOConfig defaults: beta 0.1, cpo_alpha 1.0
    ("cpo", dict(beta=0.5, label_smoothing=0.1, cpo_alpha=0.3)),
    ("cpo_hinge", dict(beta=0.1)),
    ("cpo_ipo", dict(beta=0.5, cpo_alpha=0.0)),
    ("simpo", dict(beta=0.1)),  # TRL's default: simpo_gamma 0.5, cpo_alpha 1.0 (CPO-SimPO)
    ("simpo", dict(beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)),  # the SimPO paper's loss
    ("simpo", dict(beta=2.5, simpo_gamma=1.4, label_smoothing=0.2, cpo_alpha=0.05)),
    ("orpo", dict(beta=0.1)),  # TRL's ORPOConfig default lambda
    ("orpo", dict(beta=1.0)),
]


@pytest.mark.parametrize("loss_type,kwargs", CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_matches_trl(loss_type, kwargs):
    # ORPO: TRL takes its NLL over the chosen rows' prompt and answer, vlft over the answer; without a prompt the two
    # are the same tokens (the prompt case: test_orpo_nll_is_over_the_answer)
    batch, logits = _batch(NO_PROMPT if loss_type == "orpo" else WITH_PROMPT)
    expected, expected_grad, expected_metrics = trl_loss(loss_type, batch, logits, **kwargs)
    got, grad, metrics = vlft_loss(loss_type, batch, logits, **kwargs)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), (got, expected)
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)
    names = METRICS + (ORPO_METRICS if loss_type == "orpo" else ())
    if not kwargs.get("cpo_alpha", 1.0) and loss_type != "orpo":
        names = tuple(n for n in names if n != "nll_loss")  # TRL logs 0 when it skips the term; vlft the NLL
    for name in names:
        tolerance = 1e-7 if name == "rewards/accuracies" else 1e-10  # TRL takes that mean in float32
        assert abs(metrics[name] - float(expected_metrics[name])) < tolerance, (name, metrics[name], expected_metrics)
    # so that agreeing is not trivial: the preference term and the NLL both move the loss, and pairs differ
    assert 0 < metrics["rewards/accuracies"] < 1 and grad.abs().max() > 1e-3


def test_orpo_nll_is_over_the_answer():
    """With prompts, vlft's ORPO differs from TRL's only by the NLL's tokens: the odds-ratio term and every other
    metric agree, and vlft's NLL is the answer tokens' (TRL's CPOTrainer NLL on the same batch)."""
    batch, logits = _batch(WITH_PROMPT)
    trl_orpo, _, orpo_metrics = trl_loss("orpo", batch, logits, beta=0.5)
    _, _, cpo_metrics = trl_loss("cpo", batch, logits, beta=0.5)
    got, _, metrics = vlft_loss("orpo", batch, logits, beta=0.5)
    answer_nll = float(cpo_metrics["nll_loss"])
    assert abs(metrics["nll_loss"] - answer_nll) < 1e-12
    assert abs(float(got) - (float(trl_orpo) - float(orpo_metrics["nll_loss"]) + answer_nll)) < 1e-12
    assert abs(float(orpo_metrics["nll_loss"]) - answer_nll) > 1e-3  # the prompt tokens count in TRL's
    for name in METRICS[:-1] + ORPO_METRICS:
        assert abs(metrics[name] - float(orpo_metrics[name])) < 1e-7, name


def test_length_normalised_scores_are_mean_token_log_probs():
    """simpo and orpo compare mean token log-probs, cpo sums; by hand on one pair."""
    per_token = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, -2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert reference_free_loss(per_token, mask, loss_type="cpo").chosen_logps.tolist() == [-6.0]
    simpo = reference_free_loss(per_token, mask, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
    assert simpo.chosen_logps.tolist() == [-2.0] and simpo.rejected_logps.tolist() == [-3.0]
    # -log sigmoid(beta (mean_c - mean_r) - gamma) = -log sigmoid(2 * 1 - 1)
    assert abs(float(simpo.loss) - float(-F.logsigmoid(torch.tensor(1.0)))) < 1e-7
    assert abs(float(simpo.nll) - 2.0) < 1e-12  # mean over the chosen answer's 3 tokens


# ------------------------------------------------------------------ configuration
def test_reference_free_types_need_no_reference():
    assert all(not needs_reference([t]) for t in REFERENCE_FREE)
    assert needs_reference(["sigmoid"]) and needs_reference(["sigmoid", "sft"]) and needs_reference(["sft"])


@pytest.mark.parametrize("loss_type,weights,label_smoothing,hint", [
    (["orpo", "sigmoid"], None, 0.0, "cannot be mixed"),
    (["simpo", "sft"], None, 0.0, "cannot be mixed"),
    (["orpo"], [0.5], 0.0, "--loss_weights does not apply"),
    (["orpo"], None, 0.1, "has no effect on --loss_type orpo"),
    (["cpo_hinge"], None, 0.1, "has no effect"),
    (["simpo"], None, 0.5, "[0, 0.5)"),
])
def test_check_loss_config_refuses(loss_type, weights, label_smoothing, hint):
    problems = check_loss_config(loss_type, weights, 0.1, label_smoothing)
    assert len(problems) == 1 and hint in problems[0], problems


def dpo_config(*flags):
    from transformers import HfArgumentParser

    from vlft.train.dpo.config import DPOConfig

    (config,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", "--report_to", "none", *flags])
    return config


@pytest.mark.parametrize("flags,hint", [
    (["--precompute_ref_log_probs", "true"], "--precompute_ref_log_probs: --loss_type orpo is reference-free"),
    (["--precompute_ref_batch_size", "4"], "--precompute_ref_batch_size: --loss_type orpo is reference-free"),
    (["--ld_alpha", "0.5"], "--ld_alpha weighs DPO's summed log-ratios"),
])
def test_reference_only_flags_are_refused(flags, hint):
    problems = dpo_config("--loss_type", "orpo", *flags).problems()
    assert len(problems) == 1 and hint in problems[0], problems
    assert dpo_config("--loss_type", "sigmoid", *flags).problems() == []  # with a reference they are fine


def test_defaults_are_trls():
    config = dpo_config("--loss_type", "simpo")
    assert (config.beta, config.cpo_alpha, config.simpo_gamma, config.label_smoothing) == (0.1, 1.0, 0.5, 0.0)
    assert config.problems() == []
    assert "--cpo_alpha must be >= 0" in dpo_config("--loss_type", "cpo", "--cpo_alpha", "-1").problems()[0]
