"""The KTO stage's flags: `KTOConfig` (TrainingArguments + vlft's additions + the stage's own) and `GROUPS`, the
argument groups `vlft kto` parses."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from vlft.train.core.arguments import VlftArgumentsMixin, stage_groups


@dataclass
class KTOConfig(VlftArgumentsMixin, TrainingArguments):
    """HF TrainingArguments with vlft's additions and the KTO stage's flags, under TRL's `KTOConfig` names and
    defaults (trl 1.16) for what vlft implements: the loss (train/kto/loss.py), the reference, and DPO's
    truncation and vision-once flags. TRL's `train_sampling_strategy="sequential"` is not needed: vlft fixes the
    mismatched KL answers on the dataset, not on the batch (data/kto.py)."""

    stage_key = "kto"
    stage_name = "KTO"
    router_aux_loss_joins = False

    beta: float = field(default=0.1, metadata={"help": "KTO's beta: how far the policy may move from the reference "
                                                       "(higher = closer)."})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the desirable (label true) records' losses; with "
                                       "--undesirable_weight, balances unequal counts (the start-up log advises)."}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the undesirable (label false) records' losses."}
    )
    loss_type: str = field(
        default="kto",
        metadata={"help": "kto (the KTO paper's loss, with the KL reference point) or apo_zero_unpaired (unpaired "
                          "APO-zero: no reference point), TRL's names.", "choices": ["kto", "apo_zero_unpaired"]},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs (answer and KL answer of every record) once before "
                          "training, cache them in the run directory (reused on resume) and keep no reference model "
                          "in memory."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Records per forward of the reference pass (default: the train batch size)."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "A record longer than --max_seq_length: keep_start cuts the answer from its end; drop "
                          "leaves the record out (counted). The prompt is never cut.",
                  "choices": ["keep_start", "drop"]},
    )
    encode_vision_once: bool = field(
        default=True, metadata={"help": "Run the vision tower once per record, not once per sequence: the answer and "
                                        "the KL answer share the prompt's pictures (same loss and gradients)."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off, so that policy and reference agree at step 0."}
    )

    def problems(self) -> list[str]:
        from vlft.train.kto.loss import check_loss_config

        errors = super().problems() + check_loss_config(self.loss_type, self.beta, self.desirable_weight,
                                                        self.undesirable_weight)
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            errors.append("--precompute_ref_batch_size must be >= 1")
        return errors


GROUPS = stage_groups(KTOConfig)
