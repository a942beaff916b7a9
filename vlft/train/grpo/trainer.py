"""The GRPO trainer: HF's Trainer with vlft's additions (train/core/trainer.py), rollouts and a clipped policy-gradient
loss (GRPO, arXiv 2402.03300; DAPO 2503.14476; Dr. GRPO 2503.20783; GSPO 2507.18071).

Why not `VlftTrainerMixin + trl.GRPOTrainer`: TRL 1.16's GRPOTrainer takes only a `datasets.Dataset` and builds the
model inputs with its own processor call (images only, no video; pixels and grids not those of vlft's data path),
so media would not go through vlft's preparation. Here each step, for the B prompts of this process:

1. rollout: every prompt repeated `num_generations` times (its pixels with it), left-padded by the SFT collator,
   `generate` on the unwrapped model (TRL's `unwrap_model_for_generation`: ZeRO-3 weights gathered, so ranks
   with and without media never wait on each other inside `generate`);
2. completions cut after their first end-of-turn token; texts decoded; every reward function called with TRL's
   signature (train/grpo/rewards.py), the weighted sum turned into group advantages (train/grpo/loss.py);
3. training rows: prompt + completion, right-padded by the same SFT collator (distributed dummy media included),
   labels on the completion tokens, and the reference's per-token log-probs when --beta > 0;
4. the loss (train/grpo/loss.py, TRL's formulas) on the policy's log-probs from one forward of those rows.

With --num_iterations N > 1 (TRL's mu) a cycle is N optimizer steps: its first step generates (steps 1-4 above, one
rollout per micro-batch) and keeps each micro-batch's training batch (advantages and reference log-probs included);
the next N - 1 steps train on those batches again, in the same order, against the log-probs of the policy that
generated them (`old_per_token_logps`: the first pass's own log-probs, detached; no optimizer step falls between a
micro-batch's rollout and its first loss, so they are that policy's exactly, without a second forward). The sampler
(PromptStepSampler) yields each step's prompts N times in a row, so an epoch uses every prompt N times and
--max_steps, epochs and the progress bar count optimizer steps as in TRL. As in TRL, the prompts at the end of an
epoch's shuffled order that do not fill an optimizer step are left out of that epoch, so every step trains on as many
completions as configured; `epoch_plan` logs how many at start-up. A checkpoint inside a cycle holds each
process's kept batches (vlft_rollouts_rank<r>.pt), so a resumed run replays what the straight run would have.

All G completions of a prompt are generated on the process that holds the prompt, so the group statistics need no
communication. Logged: TRL's metric names (reward, reward_std, rewards/<f>/mean|std, frac_reward_zero_std,
completions/mean_length, completions/clipped_ratio, clip_ratio/*, kl) and `completions.jsonl` in the run directory
(a row per completion: step, record, id, media, the completion text, its `reasoning` - None without a think block - and
`answer` as the rewards read them (train/grpo/rewards.py: split_completion), truncated, the total and each reward); the
reward and completion metrics and completions.jsonl once per rollout (replayed steps log the loss metrics only).
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections import defaultdict
from os import PathLike
from pathlib import Path

import torch
from transformers import GenerationConfig, Trainer

from vlft.constants import END_OF_REPLY_TOKENS, VISION_TOKENS
from vlft.data.encoding import special_token_ids
from vlft.data.grpo import generation_rows, training_rows
from vlft.data.rm import PromptMedia
from vlft.errors import VlftError
from vlft.run_dir import COMPLETIONS_FILE, ROLLOUTS_FILE
from vlft.train.core.trainer import VlftTrainerMixin
from vlft.train.grpo.loss import group_advantages, grpo_loss, reward_stats, sampling_correction, weighted_rewards
from vlft.train.grpo.rewards import (
    CONVERSATIONAL,
    TEXT,
    conversational_completion,
    conversational_prompt,
    split_completion,
    takes_prompt_media,
)
from vlft.train.preference.logprobs import completion_columns, completion_log_probs
from vlft.train.preference.reference import FrozenCopy


class GRPOTrainer(VlftTrainerMixin, Trainer):
    """vlft's GRPO stage. Keyword arguments on top of the mixin's:

    reward_funcs: [(name, function)] (train/grpo/rewards.py: load_reward_funcs); reward_weights: one per function;
    reward_shapes: one per function, rewards.TEXT (strings, the default) or rewards.CONVERSATIONAL (TRL's message
    lists), as the pre-flight found them (train/grpo/rewards.py: preflight_rewards).
    samples: the dataset's PromptSamples (their `columns` reach the reward functions by name).
    generation_collator: SFTCollator with left padding and no dummy media (rollouts);
    training_collator: the stage's SFTCollator (right padding, dummy media in distributed runs).
    encoder: the ChatEncoder (prompt texts for the reward functions).
    reference: train/preference/reference.py's AdaptersOff or FrozenCopy when --beta > 0, else None."""

    def __init__(self, *args, reward_funcs, reward_weights=None, reward_shapes=None, samples, generation_collator,
                 training_collator, encoder, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self.reward_funcs = reward_funcs
        self.reward_shapes = list(reward_shapes or [TEXT] * len(reward_funcs))
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
        self.samples = samples
        self.column_names = sorted({k for s in samples for k in s.columns})
        self.generation_collator = generation_collator
        self.training_collator = training_collator
        self.encoder = encoder
        self.reference = reference
        self._train_batch_size = a.per_device_train_batch_size // a.num_generations  # prompts per step
        self.model_accepts_loss_kwargs = False  # the loss is normalised per micro-batch; the Trainer divides by GA
        self._metrics: dict[str, list[float]] = defaultdict(list)
        tokenizer = encoder.tokenizer
        self.end_ids = special_token_ids(tokenizer, END_OF_REPLY_TOKENS)
        if not self.end_ids:
            raise VlftError(f"the tokenizer has none of {', '.join(END_OF_REPLY_TOKENS)}: GRPO could not tell where a "
                            "completion ends; vlft supports the Qwen-VL tokenizers")
        self.generation_config = GenerationConfig(
            # a completion holding a vision placeholder would break the training forward (no pixels for it)
            suppress_tokens=special_token_ids(tokenizer, VISION_TOKENS),
            max_new_tokens=a.max_completion_length, do_sample=True, temperature=a.temperature, top_p=a.top_p,
            top_k=a.top_k, eos_token_id=self.end_ids, pad_token_id=tokenizer.pad_token_id,
            use_cache=True)  # top_k 0 = off, as in TRL (None would let transformers apply its default, 50)
        self.completions_path = Path(a.output_dir) / COMPLETIONS_FILE
        self.keep_generation_logits = False  # tests: keep the sampling logits of the last rollout
        self.last_rollout: dict | None = None
        self.vllm = None  # --use_vllm: train/grpo/vllm_rollout.py's VllmRollout generates instead of model.generate
        if a.use_vllm:
            from vlft.train.grpo.vllm_rollout import VllmRollout

            self.vllm = VllmRollout(self)
        # --num_iterations > 1: the cycle's kept training batches {"step": the global_step that generated them,
        # "records": dataset indices per micro-batch, "batches": the built batches}, and (global_step, index of its
        # last micro-batch) to tell where in a step a micro-batch falls
        self.rollouts: dict | None = None
        self._completions_trimmed = False
        self._micro = (-1, -1)
        self._resumed_from: str | None = None

    def _get_train_sampler(self, train_dataset=None):
        a = self.args
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = a.data_seed if a.data_seed is not None else a.seed
        return PromptStepSampler(len(dataset), prompts_per_step(a), a.num_iterations, seed, self)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.rollouts, self._micro, self._resumed_from = None, (-1, -1), None
        self._completions_trimmed = False
        if self.args.num_iterations > 1 and isinstance(resume_from_checkpoint, (str, PathLike)):
            self._resumed_from = str(resume_from_checkpoint)
            path = Path(resume_from_checkpoint) / ROLLOUTS_FILE.format(rank=self.args.process_index)
            if path.is_file():  # written only by a checkpoint inside a cycle
                self.rollouts = torch.load(path, map_location=self.args.device, weights_only=True)
        # HF warns on resume when the state's batch size differs from --per_device_train_batch_size: the state
        # counts prompts per step, the flag completions (TRL's convention); compare like with like
        import transformers.trainer as hf_trainer

        compare = hf_trainer.compare_trainer_and_checkpoint_args

        def compare_in_completions(args, state):
            counted = copy.copy(state)
            counted.train_batch_size = state.train_batch_size * args.num_generations
            compare(args, counted)

        hf_trainer.compare_trainer_and_checkpoint_args = compare_in_completions
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            hf_trainer.compare_trainer_and_checkpoint_args = compare

    def save_process_state(self, checkpoint: Path) -> None:
        n = self.args.num_iterations
        if n > 1 and self.state.global_step % n and self.rollouts is not None:  # the next step replays
            checkpoint.mkdir(parents=True, exist_ok=True)
            torch.save(self.rollouts, checkpoint / ROLLOUTS_FILE.format(rank=self.args.process_index))

    # ------------------------------------------------------------------ rollout
    def count_batch(self, inputs) -> None:
        pass  # the training rows are counted when they are built (_prepare_inputs)

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, dict):  # an already-built batch
            return super()._prepare_inputs(inputs)
        if self.args.num_iterations == 1 or not self.model.training:
            return self.rollout(inputs)
        return self.cycle_batch(inputs)

    def cycle_batch(self, items: list[dict]) -> dict:
        """--num_iterations N > 1: the training batch of this micro-batch. The first step of a cycle (global_step
        % N == 0) generates and keeps it; the other steps return the kept batch of the same micro-batch position,
        whose prompts the sampler repeats (checked: a mismatch would train on the wrong rollouts)."""
        n, step = self.args.num_iterations, self.state.global_step
        last_step, last_index = self._micro
        index = last_index + 1 if last_step == step else 0
        self._micro = (step, index)
        records = [int(item["record"]) for item in items]
        if step % n == 0:
            if index == 0:
                self.rollouts = {"step": step, "records": [], "batches": []}
            batch = self.rollout(items)
            self.rollouts["records"].append(records)
            self.rollouts["batches"].append(batch)
            return batch
        start, held = step - step % n, self.rollouts
        if held is None or held["step"] != start or index >= len(held["batches"]) or held["records"][index] != records:
            if held is None:
                where = (f"the checkpoint {self._resumed_from} holds no "
                         f"{ROLLOUTS_FILE.format(rank=self.args.process_index)}" if self._resumed_from
                         else "no rollouts are kept")
            else:
                where = "its prompts are not those the kept rollouts were generated from"
            raise VlftError(f"step {step + 1} should train again on the rollouts of step {start + 1} (--num_iterations "
                            f"{n}), micro-batch {index + 1}, but {where}; resume from a checkpoint written at a "
                            f"multiple of {n} steps, without --ignore_data_skip")
        batch = held["batches"][index]
        if "old_per_token_logps" not in batch:
            raise VlftError(f"step {step + 1}: the kept rollouts of step {start + 1} lack the old policy's log-probs")
        self.counts.add(batch)  # trained on again: counted again (throughput is of training tokens)
        return batch

    @torch.no_grad()
    def generate(self, items: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool], torch.Tensor]:
        """Sample `num_generations` completions per prompt item. Returns per row (prompt-major): completion ids
        (cut after the first end-of-turn token), the completion mask, whether it was truncated, and the batch the
        model generated from (for tests; under --use_vllm: what vLLM was given and returned)."""
        if self.vllm is not None:
            return self.vllm.generate(items, self.state.global_step)
        from trl.models.utils import unwrap_model_for_generation

        a = self.args
        batch = super()._prepare_inputs(self.generation_collator(generation_rows(items, a.num_generations)))
        batch.pop("labels", None)
        width = batch["input_ids"].shape[1]
        checkpointing = getattr(a, "activation_checkpointing_kwargs", None) or a.gradient_checkpointing_kwargs
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gradient_checkpointing_kwargs=checkpointing) as model:
            config = copy.deepcopy(self.generation_config)
            config.return_dict_in_generate, config.output_logits = True, self.keep_generation_logits
            out = model.generate(**batch, generation_config=config)
        sequences = out.sequences[:, width:].cpu()
        completions, masks, truncated = [], [], []
        for row in sequences:
            ends = [k for k, t in enumerate(row.tolist()) if t in self.end_ids]
            length = ends[0] + 1 if ends else len(row)
            ids = row[:length]
            cut = not ends
            mask = torch.zeros_like(ids) if (cut and a.mask_truncated_completions) else torch.ones_like(ids)
            completions.append(ids)
            masks.append(mask)
            truncated.append(cut)
        if self.keep_generation_logits:
            self.last_rollout = {"batch": batch, "sequences": sequences, "logits": torch.stack(out.logits, 1)}
        return completions, masks, truncated, batch

    def score(self, items: list[dict], completions: list[torch.Tensor]) -> tuple[torch.Tensor, list[str], list[str]]:
        """Every reward function on this step's completions -> ([N, F] rewards, NaN where a function returned
        None), with the completion texts and prompt texts. Each function gets the shape the pre-flight found for it
        (`reward_shapes`): strings, or TRL's conversational shape (prompts as message lists, completions as
        [{"role": "assistant", "content": text}])."""
        g = self.args.num_generations
        tokenizer = self.encoder.tokenizer
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        samples = [self.samples[int(item["record"])] for item in items for _ in range(g)]
        rendered = [self.encoder.render(self.samples[int(item["record"])].messages, add_generation_prompt=True)[0]
                    for item in items]  # once per prompt, not once per completion
        prompts = [text for text in rendered for _ in range(g)]
        # every column of the data at every call, None where a record lacks it (TRL passes a Dataset's columns):
        # a step whose prompts all lack a column must not drop that argument
        columns = {k: [s.columns.get(k) for s in samples] for k in self.column_names}
        columns.setdefault("id", [s.id for s in samples])
        # what TRL's GRPOTrainer adds to every call: the trainer state, and hooks to log a metric or a column
        extras = {"trainer_state": self.state, "log_metric": lambda name, value: self._metrics[name].append(value),
                  "log_extra": lambda column, values: None}
        columns.setdefault("max_completion_length", self.args.max_completion_length)  # the built-in overlong reads it
        per_func = torch.full((len(texts), len(self.reward_funcs)), math.nan)
        ids = [c.tolist() for c in completions]
        media = None  # each completion's prompt with its media, for the functions that take it (a reward model)
        if any(takes_prompt_media(func) for _, func in self.reward_funcs):
            dataset = self.train_dataset
            records = [int(item["record"]) for item in items for _ in range(g)]
            media = {"prompt_media": [PromptMedia(self.samples[r].messages, dataset.image_paths[r],
                                                  dataset.video_sources[r], key=r) for r in records]}
        for f, (name, func) in enumerate(self.reward_funcs):
            if self.reward_shapes[f] == CONVERSATIONAL:  # TRL's shape for chat prompts; new lists for every call
                shaped = {"prompts": [conversational_prompt(s.messages) for s in samples],
                          "completions": [conversational_completion(t) for t in texts]}
            else:
                shaped = {"prompts": prompts, "completions": texts}
            values = func(**shaped, completion_ids=ids, **columns, **extras,
                          **(media if media is not None and takes_prompt_media(func) else {}))
            if not isinstance(values, (list, tuple)) or len(values) != len(texts):
                got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
                raise VlftError(f"reward {name!r} returned {got} value(s) for {len(texts)} completions at step "
                                f"{self.state.global_step + 1}; return one float (or None) per completion")
            per_func[:, f] = torch.tensor([math.nan if v is None else float(v) for v in values])
        return per_func, texts, prompts

    def rollout(self, items: list[dict]) -> dict:
        a = self.args
        completions, masks, truncated, generated = self.generate(items)
        per_func, texts, prompts = self.score(items, completions)
        rewards = weighted_rewards(per_func, self.reward_weights)
        # every group lies on one process; --scale_rewards batch divides by the std of all processes' rewards (TRL's
        # generation batch): compute on the gathered rewards (equal counts per process) and keep this slice
        everyone = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
        start = self.accelerator.process_index * len(rewards)
        advantages = group_advantages(everyone, a.num_generations, a.scale_rewards)[0][start:start + len(rewards)]
        rows = training_rows(items, a.num_generations, completions, masks)
        batch = super()._prepare_inputs(self.training_collator(rows))
        self.counts.add(batch)
        batch["advantages"] = advantages.to(batch["input_ids"].device)
        if self.vllm is not None and a.vllm_importance_sampling_correction:
            # the sampler's log-prob of each completion token, at that token's position in the rows (NaN elsewhere)
            if generated.get("sampling_logps") is None:
                raise VlftError("vLLM returned no log-probs for the completions, which "
                                "--vllm_importance_sampling_correction needs; pass it false, or update vllm / trl")
            sampling = torch.full(batch["input_ids"].shape, math.nan, dtype=torch.float32)
            for i, (row, logps) in enumerate(zip(rows, generated["sampling_logps"])):
                start = len(row["input_ids"]) - len(logps)
                sampling[i, start:start + len(logps)] = logps
            batch["sampling_logps"] = sampling.to(batch["input_ids"].device)
        if a.beta > 0:
            batch["ref_per_token_logps"] = self.reference_log_probs(batch)
        self._log_rollout(items, per_func, rewards, completions, truncated, texts, prompts)
        return batch

    def _trim_completions(self) -> None:
        """Before this run's first row: drop the rows of steps after the one it starts from, which a killed run
        wrote past its last checkpoint (a resume trains those steps again and writes them anew; a restart from step
        0 leaves nothing). The file is rewritten through a temporary one and renamed."""
        self._completions_trimmed = True
        path = self.completions_path
        if not path.is_file():
            return
        start = self.state.global_step  # rows carry the step they were generated for, counted from 1
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) <= start]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    @torch.no_grad()
    def reference_log_probs(self, batch: dict) -> torch.Tensor:
        ref = self.reference
        if isinstance(ref, FrozenCopy):
            ref.prepare(self)
            return completion_log_probs(ref.prepared, batch, temperature=self.args.temperature)[0]
        with ref.active():
            return completion_log_probs(self.model_wrapped, batch, temperature=self.args.temperature)[0]

    def _log_rollout(self, items, per_func, rewards, completions, truncated, texts, prompts) -> None:
        a = self.args
        gather = self.accelerator.gather
        device = self.accelerator.device
        all_per_func = gather(per_func.to(device)).cpu()
        all_rewards = gather(rewards.to(device)).cpu()
        names = [name for name, _ in self.reward_funcs]
        for key, value in reward_stats(all_per_func, names, all_rewards, a.num_generations, a.scale_rewards).items():
            self._metrics[key].append(value)
        lengths = gather(torch.tensor([len(c) for c in completions], device=device, dtype=torch.float)).cpu()
        cut = gather(torch.tensor(truncated, device=device, dtype=torch.float)).cpu()
        self._metrics["completions/mean_length"].append(lengths.mean().item())
        self._metrics["completions/min_length"].append(lengths.min().item())
        self._metrics["completions/max_length"].append(lengths.max().item())
        self._metrics["completions/clipped_ratio"].append(cut.mean().item())
        if a.log_completions:
            from accelerate.utils import gather_object

            rows = []
            for k, text in enumerate(texts):
                sample = self.samples[int(items[k // a.num_generations]["record"])]
                reasoning, answer = split_completion(text, prompts[k])  # what the answer-scoring rewards read
                rows.append({"step": self.state.global_step + 1, "record": sample.index, "id": sample.id,
                             "images": sample.images, "videos": sample.videos, "completion": text,
                             "reasoning": reasoning, "answer": answer,
                             "truncated": truncated[k], "reward": _finite(rewards[k].item()),
                             "rewards": {n: _finite(per_func[k, f].item()) for f, n in enumerate(names)}})
            rows = gather_object(rows)
            if self.accelerator.is_main_process:
                self.completions_path.parent.mkdir(parents=True, exist_ok=True)
                if not self._completions_trimmed:
                    self._trim_completions()
                with self.completions_path.open("a") as fh:
                    for row in rows:
                        fh.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        per_token, mask = completion_log_probs(model, inputs, temperature=a.temperature)
        old = inputs.get("old_per_token_logps")  # None on the first pass over a rollout: ratio 1 (TRL's detach)
        sampling_ratio = None
        if "sampling_logps" in inputs:  # vLLM rollouts: TRL's importance-sampling correction (train/grpo/loss.py)
            sampling = inputs["sampling_logps"][:, completion_columns(inputs["labels"]) + 1].to(per_token.dtype)
            behaviour = per_token.detach() if old is None else old  # the policy that sampled, as the trainer sees it
            sampling_ratio = sampling_correction(
                behaviour, sampling, mask, mode=a.vllm_importance_sampling_mode,
                clip_min=a.vllm_importance_sampling_clip_min, clip_max=a.vllm_importance_sampling_clip_max)
            if old is None:  # once per rollout
                self._log_sampling_gap(behaviour, sampling, mask, sampling_ratio)
        out = grpo_loss(per_token, old, inputs["advantages"], mask, loss_type=a.loss_type,
                        epsilon_low=a.epsilon, epsilon_high=a.epsilon_high if a.epsilon_high is not None else a.epsilon,
                        beta=a.beta, ref_per_token_logps=inputs.get("ref_per_token_logps"),
                        importance_sampling_level=a.importance_sampling_level,
                        max_completion_length=a.max_completion_length,
                        # per micro-batch: the Trainer divides by the accumulation steps (model_accepts_loss_kwargs
                        # is off); dapo normalises by this micro-batch's tokens (TRL: the generation batch's, which
                        # is the same when the accumulated micro-batches hold equal token counts)
                        gradient_accumulation_steps=1, steps_per_generation=1, sampling_ratio=sampling_ratio)
        if old is None and a.num_iterations > 1 and model.training:
            # the first pass over a kept batch: no optimizer step since its rollout, so these are the log-probs of
            # the policy that sampled it; the later passes of the cycle take their importance ratio against them
            inputs["old_per_token_logps"] = per_token.detach()
        gather = self.accelerator.gather_for_metrics
        metrics = dict(out.clip_metrics)
        if out.kl_mean is not None:
            metrics["kl"] = out.kl_mean
        for key, value in metrics.items():
            self._metrics[key].append(gather(torch.as_tensor(value, device=per_token.device)).float().mean().item())
        return (out.loss, out) if return_outputs else out.loss

    def _log_sampling_gap(self, behaviour, sampling, mask, ratio) -> None:
        """TRL's sampling/* metrics: |trainer - vLLM| log-prob gap over the loss tokens vLLM scored, and the ratio."""
        gather = self.accelerator.gather
        scored = mask.bool() & ~torch.isnan(sampling)
        gap = (behaviour - sampling).abs()[scored]
        zero = torch.zeros((), device=mask.device)
        shown = ratio.flatten() if ratio.shape[1] == 1 else ratio[mask.bool()]
        for name, value, reduce in (
                ("sampling/sampling_logp_difference/mean", gap.mean() if gap.numel() else zero, "mean"),
                ("sampling/sampling_logp_difference/max", gap.max() if gap.numel() else zero, "max"),
                ("sampling/importance_sampling_ratio/min", shown.min() if shown.numel() else zero, "min"),
                ("sampling/importance_sampling_ratio/mean", shown.mean() if shown.numel() else zero, "mean"),
                ("sampling/importance_sampling_ratio/max", shown.max() if shown.numel() else zero, "max")):
            values = gather(value.float().reshape(1))
            self._metrics[name].append(getattr(values, reduce)().item())

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for key in list(self._metrics):
                values = [v for v in self._metrics.pop(key) if not math.isnan(v)]
                if values:
                    logs[key] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)


def _row_step(line: str) -> float:
    """The step of one completions.jsonl row (inf for a line that is not one: it goes with the dropped rows)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def prompts_per_step(args) -> int:
    """Prompts of one optimizer step over all processes: per_device_train_batch_size / num_generations (prompts per
    micro-batch) x gradient_accumulation_steps x processes. TRL's generation batch in prompts
    (generation_batch_size / num_generations, with steps_per_generation = gradient_accumulation_steps)."""
    return args.per_device_train_batch_size // args.num_generations * args.gradient_accumulation_steps * args.world_size


def epoch_plan(prompts: int, args) -> tuple[int, int, str]:
    """(optimizer steps per epoch, prompts left out of each epoch, a log line saying both with the numbers).

    TRL's rule (trl/trainer/utils.py RepeatSampler, which GRPOTrainer builds with batch_size = one optimizer step's
    prompts): an epoch's shuffled prompts are cut into blocks of `prompts_per_step(args)`, an incomplete last block
    is dropped, and each block trains `num_iterations` steps. VlftError when the data holds fewer prompts than one
    step takes (an epoch would have no step), naming the flags to lower."""
    block = prompts_per_step(args)
    micro = args.per_device_train_batch_size // args.num_generations
    blocks, left = divmod(prompts, block)
    how = (f"{block} a step: --per_device_train_batch_size {args.per_device_train_batch_size} / --num_generations "
           f"{args.num_generations} = {micro} a micro-batch x {args.gradient_accumulation_steps} accumulation "
           f"step(s) x {args.world_size} process(es)")
    if blocks == 0:
        raise VlftError(f"GRPO: the data holds {prompts} usable prompt(s), fewer than one optimizer step takes ({how}); "
                        "an epoch would have no step -> lower --gradient_accumulation_steps or "
                        "--per_device_train_batch_size, or add prompts")
    steps = blocks * args.num_iterations
    line = f"GRPO: {prompts} prompts, {how}: {steps} optimizer step(s) per epoch"
    if args.num_iterations > 1:
        line += f" ({blocks} rollouts, each trained on {args.num_iterations} times)"
    if left:
        line += (f"; {left} prompt(s) of each epoch's shuffled order are left out, as in TRL (an incomplete step is "
                 f"dropped; the order, so the prompts left out, changes every epoch). For every prompt in every "
                 f"epoch, give a multiple of {block} prompts")
    return steps, left, line


class PromptStepSampler(torch.utils.data.Sampler):
    """The epoch's shuffled prompts in blocks of one optimizer step's prompts on all processes (`prompts_per_step`),
    each block yielded `repeats` (--num_iterations, TRL's mu) times in a row, so that every process gets the same
    prompts, micro-batch by micro-batch, on the N steps of a cycle; an epoch is then N times as many steps and uses
    each prompt N times. A last, incomplete block is dropped, as TRL's RepeatSampler drops it (a step with fewer
    prompts would train on fewer completions than configured; `epoch_plan` logs how many prompts that leaves out).
    The order of epoch e depends on (seed + e) alone, the same on every process and in a resumed run."""

    def __init__(self, size: int, block: int, repeats: int, seed: int, trainer):
        self.size, self.block, self.repeats, self.seed = size, block, repeats, seed
        self.trainer = trainer

    def __len__(self) -> int:
        return self.size // self.block * self.block * self.repeats

    def __iter__(self):
        epoch = int(self.trainer.state.epoch or 0)
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        for start in range(0, self.size // self.block * self.block, self.block):
            block = order[start:start + self.block]
            for _ in range(self.repeats):
                yield from block
