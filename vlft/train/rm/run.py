"""A vision-language reward model from preference pairs (full or LoRA): a Qwen-VL with a scalar head, trained with the
Bradley-Terry loss (InstructGPT, arXiv 2203.02155), which GRPO can then use as a reward (`--reward_funcs rm:RUN`).

    vlft rm --model_id Qwen/Qwen2.5-VL-3B-Instruct --data_path pairs.json --image_folder images/ \
        --eval_data_path held_out.json --output_dir output/rm_run --lora_enable true --bf16 true

The order of the other stages (train/sft/run.py): arguments, data preparation (every pair, and the held-out pairs,
checked before the model loads), model set-up (train/core/setup.py, one definition for every stage), then the head
(train/rm/model.py), the data pipeline (data/rm.py: DPO's pairs with a margin) and the trainer (train/rm/trainer.py).
The run directory is an SFT run's plus the head's files (run_dir.py REWARD_HEAD_WEIGHTS, REWARD_HEAD_CONFIG);
train/rm/model.py `load_reward_model` opens it.
"""
from __future__ import annotations

from vlft.config import family_for, parse_args, validate
from vlft.data.collator import SFTCollator
from vlft.data.mixture import prepare_mixture
from vlft.data.prepare import length_flag_of, prepare_data
from vlft.data.processor_media import apply_media_settings
from vlft.data.reasoning import Thinking
from vlft.data.rm import RewardCollator, RewardDataset, reward_format
from vlft.errors import VlftError
from vlft.train.core.launch import batch_warning, check_output_dir, check_training_flags, run_stage, train_and_save
from vlft.train.core.stage import length_order, trainer_kwargs
from vlft.train.rm.config import GROUPS as RM_GROUPS
from vlft.utils import log


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_family, load_processor
    from vlft.train.core.setup import disable_dropout, prepare_model, refuse_base_mutating_init
    from vlft.train.rm.model import attach_reward_head, freeze_unused_lm_head
    from vlft.train.rm.trainer import RewardTrainer

    model_args, data_args, tune_args, train_args = parse_args(RM_GROUPS, argv, prog="vlft rm")
    validate(model_args, data_args, tune_args, train_args, family=family_for(model_args))
    if data_args.train_empty_think:
        raise VlftError("--train_empty_think decides which tokens SFT learns; a reward model reads one score per "
                        "sequence: drop the flag")
    # evaluation as SFT has it: --eval_data_path turns on --eval_strategy steps (train/core/launch.py)
    check_training_flags(data_args, train_args, stage="rm")
    if data_args.packing:
        raise VlftError("--packing is not available for vlft rm: a pair's two rows share one prompt and each row's "
                        "reward is read at its last token; drop --packing")
    if tune_args.virtual_tokens:  # the head reads the language model's output: virtual tokens would be a second input
        raise VlftError(f"vlft rm with --peft_type {tune_args.peft_type}: virtual tokens are proven for vlft sft only; "
                        "use LoRA (--lora_enable true) or full fine-tuning")
    refuse_base_mutating_init(tune_args, "vlft rm")  # PiSSA / OLoRA: proven for SFT; the head is saved beside
    check_output_dir(train_args)

    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))
    apply_media_settings(processor, media)  # saved with every checkpoint: GRPO's rm: reward encodes as training did
    max_length = data_args.max_seq_length
    thinking = Thinking.from_args(data_args)
    fmt = reward_format(max_length)

    def prepare(path, *_):  # the training files and the held-out pairs: the same checks, media settings and limit
        return prepare_data(path, fmt, processor=processor, image_folder=data_args.image_folder, media=media,
                            max_seq_length=max_length, reject_overlong=data_args.reject_overlong,
                            skip_bad_samples=data_args.skip_bad_samples, **data_args.preparation(),
                            length_flag=length_flag_of(data_args), thinking=thinking,
                            max_bad_fraction=data_args.max_bad_fraction)

    data = prepare_mixture(data_args.data_path, fmt, seed=train_args.seed, prepare=prepare)
    log(f"data: {data.summary()}")
    batch_warning(len(data.samples), train_args, what="pairs")
    eval_data = prepare(data_args.eval_data_path) if data_args.eval_data_path else None
    if eval_data is not None:
        when = (f"every {train_args.eval_steps:g} steps (--eval_steps)" if train_args.eval_strategy == "steps"
                else f"every {train_args.eval_strategy.value}")
        log(f"eval data: {eval_data.summary()}; eval_loss, eval_accuracy and eval_margin {when}")

    prepared = prepare_model(model_args, tune_args, train_args)  # load, Liger, LoRA, freeze
    if train_args.disable_dropout:
        disable_dropout(prepared.model)
    owner = prepared.base_model
    attach_reward_head(owner, seed=train_args.seed)  # trainable, next to LoRA too (TRL: modules_to_save)
    frozen = " (the LM head's own weight is frozen: a reward does not read it)" if freeze_unused_lm_head(owner) else ""
    log(f"reward head: {owner.config.model_type} last hidden state -> 1, at each sequence's last token{frozen}")

    def pairs(prepared_data):
        return RewardDataset(prepared_data.samples, prepared_data.image_paths, processor, media=media,
                             video_sources=prepared_data.video_sources, raw_pixels=True,
                             rejected_media=prepared_data.rejected_media, thinking=thinking)

    dataset = pairs(data)
    eval_dataset = pairs(eval_data) if eval_data is not None else None
    collator = RewardCollator(SFTCollator.for_model(processor, owner, family=prepared.family,
                                                    distributed=train_args.world_size > 1))
    groups = (model_args, data_args, tune_args, train_args)
    trainer = RewardTrainer(**trainer_kwargs(prepared, processor, dataset, collator, groups,
                                             order=length_order(data.lengths, data_args, train_args)),
                            eval_dataset=eval_dataset, head_owner=owner)
    return train_and_save(trainer, lora=tune_args.any_lora)


def main(argv: list[str] | None = None) -> int:
    return run_stage(run, argv)
