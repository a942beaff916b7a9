"""The SFT stage's flags: `SFTConfig` (TrainingArguments + vlft's additions + the stage's own) and `GROUPS`, the
argument groups `vlft sft` parses."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from vlft.train.core.arguments import VlftArgumentsMixin, stage_groups


@dataclass
class SFTConfig(VlftArgumentsMixin, TrainingArguments):
    """HF TrainingArguments with vlft's additions (the SFT stage)."""

    evaluates = True


GROUPS = stage_groups(SFTConfig)
