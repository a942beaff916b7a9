"""The reward-model stage's flags: `RewardConfig` (TrainingArguments + vlft's additions + the stage's own) and
`GROUPS`, the argument groups `vlft rm` parses."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from vlft.train.core.arguments import VlftArgumentsMixin, stage_groups


@dataclass
class RewardConfig(VlftArgumentsMixin, TrainingArguments):
    """HF TrainingArguments with vlft's additions and the reward stage's flags, under TRL's `RewardConfig` names and
    defaults (trl 1.16) for what vlft implements: the centring term and dropout. TRL's `max_length` is vlft's
    --max_seq_length (a longer pair is left out, as TRL filters it); the margin is a column of the data (data/rm.py)."""

    stage_key = "rm"
    stage_name = "reward model"
    evaluates = True
    router_aux_loss_joins = False

    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of mean((r_chosen + r_rejected)^2) added to the loss, which keeps the rewards near "
                          "zero (arXiv 2312.09244, eq. 2; TRL recommends 0.01). Unset: no such term."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model (TRL's default)."})
    encode_vision_once: bool = field(
        default=True, metadata={"help": "Run the vision tower once per pair, not once per answer: chosen and rejected "
                                        "share the prompt's pictures (the same rewards and gradients)."})

    def problems(self) -> list[str]:
        errors = super().problems()
        coef = self.center_rewards_coefficient
        if coef is not None and not (math.isfinite(coef) and coef >= 0):
            errors.append(f"--center_rewards_coefficient must be a finite number >= 0, got {coef}")
        return errors


GROUPS = stage_groups(RewardConfig)
