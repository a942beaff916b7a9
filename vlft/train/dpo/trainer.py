"""The DPO trainer: HF's Trainer with vlft's additions (train/core/trainer.py), the preference stages' reference
machinery (train/preference/trainer.py) and a pair loss.

Why not `VlftTrainerMixin + trl.DPOTrainer`: TRL 1.16's DPOTrainer takes only a `datasets.Dataset`, tokenises
and collates images itself (its own processor call and layout, no video), replaces the model's forward with a fused
LM head, caches reference log-probs by the `datasets` fingerprint, and inlines its losses in `_compute_loss`. vlft
keeps its own data path (one chat encoder, bit-exact pixels, video timing, mRoPE, the distributed dummy media) and
the model's library forward, so the DPO trainer is vlft's: the losses are TRL's formulas under TRL's names
(train/dpo/loss.py, proven equal to TRL's `_compute_loss` in tests/train/test_dpo_loss.py and to its CPO / ORPO
trainers' methods in tests/train/test_pair_losses.py), the metrics TRL's.

A batch (data/dpo.py) holds 2B rows, [chosen; rejected], with labels on the completion tokens. One forward of
the policy gives each row's completion log-probs; the reference's come from a second forward without gradients
or from the precomputed cache (both: `ReferenceTrainerMixin`). A reference-free loss (--loss_type cpo, cpo_hinge,
cpo_ipo, simpo, orpo) uses the policy's forward alone: the stage holds no reference.
"""
from __future__ import annotations

from collections import defaultdict

from transformers import Trainer

from vlft.train.core.trainer import VlftTrainerMixin
from vlft.train.dpo.loss import (
    needs_reference,
    preference_loss,
    reference_free_loss,
    reward_metrics,
    sequence_logps,
)
from vlft.train.preference.logprobs import (  # noqa: F401 (re-exported: tests and older imports read them here)
    completion_log_probs,
    encode_vision_once,
)
from vlft.train.preference.reference import ReferenceCache  # noqa: F401 (re-exported)
from vlft.train.preference.trainer import ReferenceTrainerMixin


class DPOTrainer(ReferenceTrainerMixin, VlftTrainerMixin, Trainer):
    """vlft's pair stage (`vlft dpo`): the loss of --loss_type on each batch, TRL's metrics in the log. Keyword
    arguments: the mixins' (`reference`, `ref_cache`, `media_sha256`: train/preference/trainer.py)."""

    items_name = "pairs"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.args.loss_type)

    def sequence_log_probs(self, per_token, mask):
        """Summed completion log-probs, LD-weighted under --ld_alpha (train/dpo/loss.py `sequence_logps`)."""
        return sequence_logps(per_token, mask, self.args.ld_alpha)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        per_token, mask = self.policy_log_probs(model, inputs)
        args = self.args
        mode = "train" if model.training else "eval"
        if not self.needs_reference:
            free = reference_free_loss(per_token, mask, loss_type=args.loss_type[0], beta=args.beta,
                                       label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
                                       cpo_alpha=args.cpo_alpha)
            loss, chosen, rejected = free.loss, free.chosen_logps, free.rejected_logps
            metrics = {**reward_metrics(free.chosen_rewards, free.rejected_rewards, chosen, rejected),
                       "nll_loss": free.nll, **free.extra}
        else:
            logps = self.sequence_log_probs(per_token, mask)
            chosen, rejected = logps.chunk(2)
            ref_chosen, ref_rejected = self.reference_values(model, inputs).to(logps.dtype).chunk(2)
            out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=args.loss_type,
                                  loss_weights=args.loss_weights, beta=args.beta, label_smoothing=args.label_smoothing,
                                  discopop_tau=args.discopop_tau, completion_lengths=mask.sum(1),
                                  completion_mask=mask, per_token_logps=per_token)
            loss = out.loss
            metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, chosen.detach(), rejected.detach())
        for name, value in metrics.items():
            value = value.reshape(-1) if value.dim() == 0 else value  # batch scalars: one value per process
            self._metrics[f"{mode}:{name}"].append(self.accelerator.gather_for_metrics(value).float().mean().item())
        return (loss, {"chosen_logps": chosen, "rejected_logps": rejected}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key in [k for k in self._metrics if k.startswith(f"{mode}:")]:
            values = self._metrics.pop(key)
            logs[prefix + key.split(":", 1)[1]] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)
