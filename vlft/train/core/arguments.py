"""vlft's additions to every stage's TrainingArguments subclass: `VlftArgumentsMixin` (each stage's config,
train/<stage>/config.py, puts it first) and `stage_groups`, the argument groups a training command parses."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class VlftArgumentsMixin:
    """vlft's additions to any `TrainingArguments` subclass (HF's, TRL's `DPOConfig` / `GRPOConfig`): defaults
    suited to VLM training, flags transformers 5 dropped, and the workarounds for the transformers versions vlft
    supports. Put it first: `class SFTConfig(VlftArgumentsMixin, TrainingArguments)`."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds files."}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of steps for LR warm-up (kept for 2U1 scripts; sets warmup_steps)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: vlft's collator builds the batch."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    log_line_steps: int = field(
        default=10, metadata={"help": "Print one readable line of the latest figures every N steps (and at the first "
                                      "and last); 0: none. Every --logging_steps entry still goes to the reporters "
                                      "and to <output_dir>/log.jsonl."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation keeps the loss only: vlft computes no metric from the logits, and "
                                        "gathering them (vocabulary x tokens per record) would fill the memory."}
    )
    skip_nonfinite_steps: int = field(
        default=0, metadata={"help": "Steps with a non-finite loss or gradient norm to skip (the optimizer leaves the "
                                     "weights as they were) before the run stops; 0: stop at the first, naming the "
                                     "step and its records. Not with --deepspeed (its engine steps inside backward)."}
    )

    # The stage's row in vlft/stages.py, how messages name it, whether its loss is the token cross-entropy that a
    # mixture-of-experts load-balancing term can join (--router_aux_loss_coef), and whether it evaluates held-out
    # records (--eval_data_path); each stage's config sets its own.
    stage_key = "sft"
    stage_name = "SFT"
    router_aux_loss_joins = True
    evaluates = False

    @classmethod
    def before_parse(cls, given: set[str]) -> None:
        """Run by vlft.config.parse_command before this class is built from the flags (`given`: the names the user
        set): under DeepSpeed its process group must exist first (train/core/launch.py: `init_distributed_early`)."""
        from vlft.train.core.launch import init_distributed_early

        init_distributed_early(deepspeed="deepspeed" in given)

    def family_problems(self, family) -> list[str]:
        """What this stage cannot do with `family` (a models/families descriptor), each with the family's reason:
        the stage itself when the family refuses it (`Family.unsupported[stage]`, e.g. "kto"); stages add theirs."""
        reason = family.refusal(self.stage_key)
        return [f"vlft {self.stage_key} is not available for {family.display_name} ({family.model_type}): "
                f"{reason}"] if reason else []

    def problems(self) -> list[str]:
        """What is wrong with these arguments together ([] when nothing); the stages' configs add theirs."""
        errors = []
        if self.skip_nonfinite_steps < 0:
            errors.append("--skip_nonfinite_steps must be >= 0")
        elif self.skip_nonfinite_steps and self.deepspeed:
            errors.append("--skip_nonfinite_steps cannot skip a step under --deepspeed: DeepSpeed's engine applies the "
                          "optimizer step inside backward, before the gradients can be checked; leave it at 0 (the run "
                          "then stops at a non-finite step, before anything is saved)")
        return errors

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.label_names is None:
            self.label_names = ["labels"]  # PeftModel hides the signature the Trainer would read it from
        if self.dataloader_pin_memory and not _has_cuda():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        _rename_checkpointing_flags(self)
        super().__post_init__()
        if self.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.distributed_state is None:
            # transformers fills the DeepSpeed config's "auto" batch sizes in __post_init__ from world_size,
            # which reads 1 until the device set-up has run; ZeRO-3's zero.Init then fails its batch check
            # ("4 != 2 * 1 * 1"). Set the devices up and fill the config again with the real world size.
            from accelerate.utils import DeepSpeedPlugin
            from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

            _ = self.device
            self.hf_deepspeed_config = HfTrainerDeepSpeedConfig(self.deepspeed)
            self.hf_deepspeed_config.trainer_config_process(self)
            self.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=self.hf_deepspeed_config)


def _rename_checkpointing_flags(args) -> None:
    """transformers >= 5.2x renamed gradient_checkpointing* to activation_checkpointing* and warns on the old
    names; users keep typing the old ones (2U1 scripts), so move them over quietly when both exist."""
    fields = args.__dataclass_fields__
    flag, kwargs = "gradient_checkpointing", "gradient_checkpointing_kwargs"
    if "activation_checkpointing" in fields:
        for old, new in ((flag, "activation_checkpointing"), (kwargs, "activation_checkpointing_kwargs")):
            if getattr(args, new) is None and getattr(args, old) is not None:
                setattr(args, new, getattr(args, old))
            setattr(args, old, None)
        kwargs = "activation_checkpointing_kwargs"
    if getattr(args, kwargs) is None:
        # Non-reentrant checkpointing works with frozen inputs (frozen tower, LoRA) without input-grad hooks.
        setattr(args, kwargs, {"use_reentrant": False})


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def stage_groups(config: type) -> tuple[type, ...]:
    """The argument groups of a training command, in parse order: model, data, tuning, then the stage's
    TrainingArguments subclass `config`."""
    from vlft.config import DataArguments, ModelArguments, TuneArguments

    return (ModelArguments, DataArguments, TuneArguments, config)
