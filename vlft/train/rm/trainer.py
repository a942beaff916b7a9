"""The reward-model trainer: HF's Trainer with vlft's additions (train/core/trainer.py) and the Bradley-Terry loss.

Why not `VlftTrainerMixin + trl.RewardTrainer`: TRL 1.16's RewardTrainer takes a `datasets.Dataset` of token ids, has
no images or videos (its collator pads `chosen_ids` / `rejected_ids` only), and builds its model with
`AutoModelForSequenceClassification`, which transformers offers for no Qwen-VL family but Qwen3.5. vlft keeps its
own data path (the DPO pairs' items and collator, data/rm.py) and its model set-up (train/core/setup.py) with a head
added (train/rm/model.py); from TRL it takes the loss, the flag names and the metric names (train/rm/loss.py).

A batch (data/rm.py) holds 2B rows, [chosen; rejected], and `margin` [B]. One forward of the model gives each row's
reward (train/rm/model.py `reward_forward`); the loss and TRL's metrics follow, in training and in evaluation
(--eval_data_path: logged as eval_loss, eval_accuracy, eval_margin, ...).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from vlft.train.core.trainer import VlftTrainerMixin
from vlft.train.preference.logprobs import MEDIA_COPIES, picture_sources
from vlft.train.rm.loss import bradley_terry_loss, reward_metrics
from vlft.train.rm.model import head_detached, head_weight, read_reward_head, reward_forward, write_reward_head


class RewardTrainer(VlftTrainerMixin, Trainer):
    """vlft's reward-model stage. Keyword arguments on top of the mixin's:

    head_owner: the bare model holding the reward head (train/rm/model.py `attach_reward_head`), inside `model`.

    Every save writes the model's files without the head (`head_detached`: they are an SFT run's, which vlft's shared
    loader opens) and the head's own files (run_dir.py REWARD_HEAD_WEIGHTS, REWARD_HEAD_CONFIG) beside them; a
    resume (and --load_best_model_at_end) reads them back the same way."""

    def __init__(self, *args, head_owner, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_owner = head_owner
        # the loss is a mean over this micro-batch's pairs: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def count_batch(self, inputs: dict) -> None:
        if not self.args.encode_vision_once:
            return super().count_batch(inputs)
        counted = dict(inputs)  # the tower sees each distinct picture once: count its patches once
        for _, _, grid_key, copies_key in MEDIA_COPIES:
            sources = picture_sources(counted, copies_key, grid_key)
            if sources:
                counted[grid_key] = counted[grid_key][[j for j, s in enumerate(sources) if s == j]]
        self.counts.add(counted)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = reward_forward(model, self.head_owner, inputs, vision_once=self.args.encode_vision_once)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, margin=inputs.get("margin"),
                                  center_rewards_coefficient=self.args.center_rewards_coefficient)
        mode = "train" if model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        # every process's pairs: min / max / accuracy of the whole batch, as TRL gathers them
        everyone = reward_metrics(gather(chosen.detach()), gather(rejected.detach()))
        for name, value in everyone.items():
            self._metrics[f"{mode}:{name}"].append(value.item())
        outputs = {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """TRL's names: accuracy, margin, mean_reward, min_reward, max_reward (the mean over the logged micro-batches;
        eval_ in front for an evaluation)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key in [k for k in self._metrics if k.startswith(f"{mode}:")]:
            values = self._metrics.pop(key)
            logs[prefix + key.split(":", 1)[1]] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and loading the head
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The Trainer's save (through vlft's run files) without the head, then the head's files (every process:
        under ZeRO-3 the head is gathered, a collective)."""
        with head_detached(self.head_owner) as head:
            super().save_model(output_dir, _internal_call)
        weight = head_weight(head)
        if self.args.should_save:
            write_reward_head(weight, output_dir or self.args.output_dir, base_model=self.vlft_args.get("model_id"))

    def identity(self) -> dict:
        """The resume identity of the language model (what its saved files hold: the head is not among them)."""
        with head_detached(self.head_owner):
            return super().identity()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """vlft's resume of the language model (the mixin's: adapter and fully trained weights, or full weights, every
        key checked) with the head out of it, then the head from the checkpoint's head file."""
        with head_detached(self.head_owner) as head:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = read_reward_head(resume_from_checkpoint)
        with torch.no_grad():
            head.weight.copy_(saved.to(head.weight.device, head.weight.dtype))
