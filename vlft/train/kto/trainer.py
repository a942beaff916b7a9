"""The KTO trainer: HF's Trainer with vlft's additions (train/core/trainer.py), the shared reference machinery
(train/preference/trainer.py) and KTO's loss (train/kto/loss.py, proven equal to TRL's `KTOTrainer._compute_loss`).

Why not TRL's KTOTrainer: the reasons DPO gives (train/dpo/trainer.py): a `datasets.Dataset` only, its own processor
call (images only, no video), a fused LM head in place of the model's forward, a reference cache keyed by the
`datasets` fingerprint. vlft keeps its data path and the model's library forward and takes TRL's formulas and names.

A batch (data/kto.py) holds 2B rows, [completion rows; KL rows], `label` [B] and `item_index` [B]. One forward of the
policy scores both halves (each picture through the vision tower once); the KL half only feeds the detached
reference point z0, so it carries no gradient. The reference's log-probs of both halves come from a second forward
without gradients, or from the cache (two columns per record: answer, KL answer).
"""
from __future__ import annotations

from collections import defaultdict

from transformers import Trainer

from vlft.data.kto import INDEX_KEY
from vlft.train.core.trainer import VlftTrainerMixin
from vlft.train.kto.loss import kl_estimate, kto_loss, kto_metrics
from vlft.train.preference.trainer import ReferenceTrainerMixin


class KTOTrainer(ReferenceTrainerMixin, VlftTrainerMixin, Trainer):
    """vlft's KTO stage; the keyword arguments are the mixins' (reference, ref_cache, media_sha256, vlft_args, ...).
    Logs TRL's metrics: kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected."""

    index_key = INDEX_KEY  # each item's dataset index (data/kto.py)
    ref_columns = 2  # [completion rows; KL rows]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def count_batch(self, inputs: dict) -> None:
        # the throughput counts take a preference batch's records from `pair_index`: one record per item, not per row
        super().count_batch({**inputs, "pair_index": inputs[self.index_key]})

    def policy_log_probs(self, model, inputs: dict):
        """The shared forward (train/preference/trainer.py) without the batch's `label` and `item_index`, which are
        no model inputs."""
        return super().policy_log_probs(model, {k: v for k, v in inputs.items() if k not in ("label", INDEX_KEY)})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        logps, kl_logps = self.sequence_log_probs(*self.policy_log_probs(model, inputs)).chunk(2)
        ref_logps, ref_kl_logps = self.reference_values(model, inputs).to(logps.dtype).chunk(2)
        # every process gathers (a collective), whatever the loss type: apo_zero_unpaired only logs it
        kl = kl_estimate(kl_logps, ref_kl_logps, gather=self.accelerator.gather)
        labels = inputs["label"]
        out = kto_loss(logps, ref_logps, labels, kl, loss_type=args.loss_type, beta=args.beta,
                       desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
        mode = "train" if model.training else "eval"
        for name, value in kto_metrics(out.rewards, logps, labels, kl, gather=self.accelerator.gather).items():
            self._metrics[f"{mode}:{name}"].append(value)
        return (out.loss, {"logps": logps, "kl_logps": kl_logps}) if return_outputs else out.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Each metric's mean over the micro-batches since the last log (TRL's), added to the Trainer's entry."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        for key in [k for k in self._metrics if k.startswith(f"{mode}:")]:
            values = self._metrics.pop(key)
            logs[("eval_" if mode == "eval" else "") + key.split(":", 1)[1]] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)
