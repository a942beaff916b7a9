"""STAGES: one row per stage, the one place a stage is known to the shared tools.

`vlft <stage>` (cli.py's command table and its flag check), `vlft check-data --stage` and `vlft preview --stage`
(which record format, which dataset, which token sequences to show) and `vlft.config.validate` (each stage's
config adds its own `problems()`) read this table; none of them names a stage. Adding a stage is its row plus its
own modules: `vlft/train/<stage>/` (config, run, trainer, loss), its record format and dataset under `vlft/data/`,
and its tests.

Every reference is a "module:attribute" string, imported only when used, so that reading the table costs nothing
(the CLI checks flags before torch is imported). tests/test_stages.py imports every reference and checks the
signatures the tools call.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage. `config` is None for a record layout that no training command reads (predict's prompts).

    - entry: module whose `main(argv) -> int` runs `vlft <name>` (training stages).
    - config: "module:Class", the stage's TrainingArguments subclass (vlft/train/<stage>/config.py); the CLI reads
      its flags from the source, `vlft.train.core.arguments.stage_groups` gives the groups a run parses.
    - record_format: "module:function", `f(max_seq_length: int, options) -> data.prepare.RecordFormat`; `options`
      is any object with the stage's own flags as attributes (its config in training, check-data's or preview's
      arguments there), read with getattr and a default.
    - dataset: "module:function", `f(prepared, processor, *, media, max_length, thinking) -> Dataset` of the items
      training builds (preview shows them).
    - collator: "module:function", `f(processor, model=None) -> callable` turning those items into a batch.
    - preview_parts: "module:function", `f(item, encoder, sample, specs) -> list[preview.Part]`: the token
      sequences of one item with the labels that train.
    - records: what one record holds (check-data's and preview's --stage help).
    - reports_reasoning: check-data counts the records that train on reasoning (stages that train on the file's
      answers with the token loss).
    - report: "module:function", `f(prepared, options, *, where) -> list[str]`: the stage's own lines in
      check-data's report (KTO: the label balance; `where` names the data files), or None.
    """

    name: str
    help: str
    records: str
    record_format: str
    dataset: str
    collator: str
    preview_parts: str
    entry: str | None = None
    config: str | None = None
    reports_reasoning: bool = False
    report: str | None = None

    def load(self, attribute: str):
        """The object a reference field (`record_format`, `dataset`, ...) names, imported now."""
        module, _, name = getattr(self, attribute).partition(":")
        target = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target

    def record_format_for(self, max_seq_length: int, options=None):
        """This stage's RecordFormat for `max_seq_length` and the stage flags in `options`."""
        return self.load("record_format")(max_seq_length, options)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("sft", "supervised fine-tuning (full or LoRA) on LLaVA-format data",
          records="conversations ending with a gpt turn",
          record_format="vlft.data.sft:record_format", dataset="vlft.data.sft:build_dataset",
          collator="vlft.data.collator:SFTCollator.for_model", preview_parts="vlft.preview:conversation_parts",
          entry="vlft.train.sft.run", config="vlft.train.sft.config:SFTConfig", reports_reasoning=True),
    Stage("dpo", "direct preference optimisation (full or LoRA) on preference pairs",
          records="preference pairs: a prompt, a chosen and a rejected answer",
          record_format="vlft.data.dpo:record_format", dataset="vlft.data.dpo:build_dataset",
          collator="vlft.data.dpo:build_collator", preview_parts="vlft.preview:completion_parts",
          entry="vlft.train.dpo.run", config="vlft.train.dpo.config:DPOConfig"),
    Stage("grpo", "GRPO (RL with reward functions) on prompts, full or LoRA",
          records="prompts, with the columns the reward functions read",
          record_format="vlft.data.grpo:record_format", dataset="vlft.data.grpo:build_dataset",
          collator="vlft.data.grpo:build_collator", preview_parts="vlft.preview:completion_parts",
          entry="vlft.train.grpo.run", config="vlft.train.grpo.config:GRPOConfig"),
    Stage("kto", "KTO (full or LoRA) on single answers marked good or bad",
          records="a prompt, one answer and its label (true: desirable, false: undesirable)",
          record_format="vlft.data.kto:record_format", dataset="vlft.data.kto:build_dataset",
          collator="vlft.data.kto:build_collator", preview_parts="vlft.train.kto.preview:preview_parts",
          entry="vlft.train.kto.run", config="vlft.train.kto.config:KTOConfig", report="vlft.data.kto:check_report"),
    Stage("rm", "a reward model (full or LoRA) from preference pairs, for GRPO's --reward_funcs rm:RUN",
          records="preference pairs: a prompt, a chosen and a rejected answer, an optional margin",
          record_format="vlft.data.rm:record_format", dataset="vlft.data.rm:build_dataset",
          collator="vlft.data.rm:build_collator", preview_parts="vlft.preview:completion_parts",
          entry="vlft.train.rm.run", config="vlft.train.rm.config:RewardConfig"),
    # (new stages' rows go here, before predict)
    Stage("predict", "prompts to answer with `vlft predict`",
          records="prompts, answers optional",
          record_format="vlft.data.sft:predict_record_format", dataset="vlft.data.sft:build_dataset",
          collator="vlft.data.collator:SFTCollator.for_model", preview_parts="vlft.preview:conversation_parts"),
)}

TRAINING_STAGES = tuple(name for name, stage in STAGES.items() if stage.config)


def stage_help() -> str:
    """The --stage help of check-data and preview: every stage and what its records hold."""
    return "Which stage's records the file holds: " + "; ".join(f"{s.name} ({s.records})" for s in STAGES.values())
