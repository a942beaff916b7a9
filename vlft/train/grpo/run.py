"""Group relative policy optimisation (GRPO, arXiv 2402.03300) of a Qwen-VL model on prompts with verifiable
answers, with reward functions written for TRL (full or LoRA).

    vlft grpo --model_id output/merged/sft --data_path prompts.json --image_folder images/ \
        --output_dir output/grpo_run --lora_enable true --reward_funcs format accuracy --num_generations 8

The order of the other stages (train/sft/run.py): arguments, data preparation (every prompt checked before the model
loads), the reward functions loaded and called once on real records with a sample completion (a missing column
or a wrong return fails here, not after the first rollout), model set-up (train/core/setup.py), the reference when
--beta > 0 (train/preference/reference.py), then the trainer (train/grpo/trainer.py). The run directory has an SFT run's
shape, so `vlft merge` and `vlft predict` take it unchanged.
"""
from __future__ import annotations

from vlft.config import family_for, parse_args, validate
from vlft.data.collator import SFTCollator
from vlft.data.encoding import ChatEncoder
from vlft.data.grpo import PROMPT, PromptDataset, first_items
from vlft.data.mixture import data_files, prepare_mixture
from vlft.data.prepare import length_flag_of
from vlft.data.processor_media import apply_media_settings
from vlft.data.reasoning import Thinking, prompt_opens_think
from vlft.errors import VlftError
from vlft.train.core.launch import batch_warning, check_output_dir, check_training_flags, run_stage, train_and_save
from vlft.train.core.setup import weights_dtype, zero_stage
from vlft.train.core.stage import trainer_kwargs
from vlft.train.grpo.config import GROUPS as GRPO_GROUPS
from vlft.train.grpo.vllm_rollout import check_vllm_data, check_vllm_flags, check_vllm_length
from vlft.train.preference.reference import freezing_flags, trained_next_to_lora
from vlft.utils import log


def sample_completions(data, encoder, n: int = 4, max_completion_length: int = 512) -> list[dict]:
    """Up to `n` real records (one per media kind and one holding each column first, more than `n` if need be) with a
    plausible completion and their resolved media (a reward model reads them), for the reward pre-flight: the
    record's solution in the think/answer layout, or a placeholder answer; without the opening `<think>` where the
    prompt already opened the block (a thinking model's generation prompt, e.g. Qwen3.5's `...<think>\\n`), as the
    model would write it."""
    kinds: dict[str, int] = {}
    for i, s in enumerate(data.samples):
        kinds.setdefault("video" if s.videos else "image" if s.images else "text", i)
        for key in s.columns:  # and a record holding each column, wherever it is (else: 'no column of the data')
            kinds.setdefault(f"column {key}", i)
    must = list(dict.fromkeys(kinds.values()))
    chosen = list(dict.fromkeys([*must, *range(len(data.samples))]))[:max(n, len(must))]
    out = []
    for i in chosen:
        s = data.samples[i]
        answer = s.columns.get("solution", "an answer")
        prompt = encoder.render(s.messages, add_generation_prompt=True)[0]
        reasoning = "Looking at the input.\n</think>" if prompt_opens_think(prompt) else "<think>Looking at the input.</think>"
        completion = f"{reasoning}\n<answer>{answer}</answer>"
        out.append({"prompt": prompt, "completion": completion,
                    "completion_ids": encoder.tokenizer(completion, add_special_tokens=False)["input_ids"],
                    "columns": {"id": s.id, **s.columns, "max_completion_length": max_completion_length},
                    "messages": s.messages, "images": data.image_paths[i], "videos": data.video_sources[i]})
    return out


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_family, load_processor
    from vlft.train.core.setup import disable_dropout, load_model_copy, prepare_model, refuse_base_mutating_init
    from vlft.train.grpo.rewards import load_reward_funcs, preflight_rewards
    from vlft.train.grpo.trainer import GRPOTrainer, epoch_plan, prompts_per_step
    from vlft.train.preference.reference import make_reference

    model_args, data_args, tune_args, train_args = parse_args(GRPO_GROUPS, argv, prog="vlft grpo")
    validate(model_args, data_args, tune_args, train_args, family=family_for(model_args))
    check_training_flags(data_args, train_args, stage="grpo")
    check_vllm_flags(tune_args, train_args)
    refuse_base_mutating_init(tune_args, "vlft grpo")
    if data_args.packing:
        raise VlftError("--packing is not available for GRPO (rollouts are generated per prompt); drop --packing")
    trained = trained_next_to_lora(tune_args)
    if train_args.beta > 0 and trained and zero_stage(train_args) == 3:
        raise VlftError(f"under ZeRO-3, --beta {train_args.beta} with LoRA and fully trained parameters next to it "
                        f"({'; '.join(trained)}) would move the reference; freeze them ({freezing_flags(tune_args)}), "
                        "or use --beta 0")
    if train_args.max_prompt_length is not None:
        max_prompt = train_args.max_prompt_length
        if max_prompt < 8:
            raise VlftError(f"--max_prompt_length {max_prompt} leaves no room for a prompt (at least 8 tokens); raise it")
    else:
        max_prompt = data_args.max_seq_length - train_args.max_completion_length
        if max_prompt < 8:
            seq_flag = length_flag_of(data_args)
            raise VlftError(f"{seq_flag} {data_args.max_seq_length} leaves no room for prompts next to "
                            f"--max_completion_length {train_args.max_completion_length} (without --max_prompt_length, "
                            f"prompts get the difference, {max_prompt}); raise {seq_flag}, lower "
                            "--max_completion_length, or set --max_prompt_length")
    check_vllm_length(train_args, max_prompt)
    check_output_dir(train_args)

    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))
    apply_media_settings(processor, media)  # saved with every checkpoint: servers resize as training did
    data = prepare_mixture(  # one or more files, each checked on its own, then each one's #N / #p selection
        data_args.data_path, PROMPT, seed=train_args.seed, processor=processor, image_folder=data_args.image_folder,
        media=media, max_seq_length=max_prompt, reject_overlong=data_args.reject_overlong,
        skip_bad_samples=data_args.skip_bad_samples, **data_args.preparation(), length_flag="--max_prompt_length",
        thinking=Thinking.from_args(data_args), max_bad_fraction=data_args.max_bad_fraction)
    log(f"data: {data.summary()} (prompts; --max_prompt_length {max_prompt})")
    if train_args.use_vllm:
        check_vllm_data(data.samples, ", ".join(data_files(data_args.data_path)))
    log(epoch_plan(len(data.samples), train_args)[2])  # TRL's rule: an incomplete last step is left out
    batch_warning(len(data.samples), train_args, what="prompts", prompts_per_step=prompts_per_step(train_args))
    encoder = ChatEncoder(processor, Thinking.from_args(data_args))
    # a reward model (rm:PATH) scores on the policy's device unless its spec names one, in the policy's dtype
    reward_funcs = load_reward_funcs(train_args.reward_funcs, device=train_args.device,
                                     dtype=weights_dtype(train_args))
    samples = sample_completions(data, encoder, max_completion_length=train_args.max_completion_length)
    checked = preflight_rewards(reward_funcs, train_args.reward_weights, samples)  # and each function's shape
    log("rewards on real records with a sample completion (before step 1):\n" + checked.table)

    prepared = prepare_model(model_args, tune_args, train_args)  # load, Liger, LoRA, freeze
    if train_args.disable_dropout:
        disable_dropout(prepared.model)
    reference = None
    if train_args.beta > 0:
        reference = make_reference(prepared, load_copy=lambda: load_model_copy(model_args, tune_args, train_args),
                                   precompute=False, zero_stage=zero_stage(train_args), can_precompute=False)
        log(reference.describe())

    dataset = PromptDataset(data.samples, data.image_paths, processor, media=media, video_sources=data.video_sources,
                            raw_pixels=True, thinking=Thinking.from_args(data_args))
    generation_collator = SFTCollator.for_model(processor, prepared.base_model, padding_side="left")
    training_collator = SFTCollator.for_model(processor, prepared.base_model, family=prepared.family,
                                              distributed=train_args.world_size > 1)
    groups = (model_args, data_args, tune_args, train_args)
    trainer = GRPOTrainer(
        **trainer_kwargs(prepared, processor, dataset, first_items, groups), reward_funcs=reward_funcs,
        reward_weights=train_args.reward_weights, reward_shapes=checked.shapes, samples=data.samples,
        generation_collator=generation_collator, training_collator=training_collator, encoder=encoder,
        reference=reference)
    return train_and_save(trainer, lora=tune_args.any_lora)


def main(argv: list[str] | None = None) -> int:
    return run_stage(run, argv)
