"""Thin Trainer subclass: per-part learning rates, real-token counting, and vlft's extra files in
every save (final and checkpoint-N)."""
from __future__ import annotations

import torch
from transformers import Trainer

from vlft.errors import VlftError
from vlft.train.checkpoint import save_extras
from vlft.train.optim import build_param_groups, groups_table
from vlft.utils import log


class VlftTrainer(Trainer):
    def __init__(self, *args, vlft_args: dict | None = None, family=None, vision_lr: float | None = None,
                 merger_lr: float | None = None, train_order=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_order = train_order  # epoch -> index order (--group_by_length), else the Trainer's sampler
        self.vlft_args = vlft_args or {}
        self.family = family
        self.vision_lr = vision_lr
        self.merger_lr = merger_lr
        self.real_tokens = torch.zeros((), dtype=torch.long)
        self.real_records = torch.zeros((), dtype=torch.long)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.family is None:
            return super().create_optimizer(model) if self.family is None else self.optimizer
        opt_model = self.model if model is None else model
        groups = build_param_groups(opt_model, self.family, lr=self.args.learning_rate,
                                    weight_decay=self.args.weight_decay, vision_lr=self.vision_lr,
                                    merger_lr=self.merger_lr)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if self._offloads_optimizer():
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam, same update rule
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer_cls = DeepSpeedCPUAdam
            optimizer_kwargs = {"lr": self.args.learning_rate, "betas": (self.args.adam_beta1, self.args.adam_beta2),
                                "eps": self.args.adam_epsilon, "adamw_mode": True}
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs:
            raise VlftError(f"--optim {self.args.optim} builds its own parameter groups, so vlft cannot apply "
                            "--vision_lr/--merger_lr or its weight-decay rules; choose an AdamW-style --optim")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        log(f"optimizer {optimizer_cls.__name__}:\n{groups_table(groups)}")
        return self.optimizer

    def _get_train_sampler(self, *args, **kwargs):
        if self.train_order is None:
            return super()._get_train_sampler(*args, **kwargs)
        return _EpochOrderSampler(self.train_order, self)

    def _offloads_optimizer(self) -> bool:
        config = self.args.hf_deepspeed_config.config if self.args.deepspeed else {}
        device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        return device in ("cpu", "nvme")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Accumulated on the device without .item(), so counting never forces a GPU sync.
        if "pack_layout" in inputs:  # packed rows: tokens of real records (column 3 flags them)
            layout = inputs["pack_layout"]
            real, records = (layout[..., 0] * layout[..., 3]).sum(), layout[..., 3].sum()
        else:
            real, records = inputs["attention_mask"].sum(), inputs["attention_mask"].shape[0]
        self.real_tokens = self.real_tokens.to(real.device) + real
        self.real_records = self.real_records.to(real.device) + records
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            gathered = state_dict if self.is_deepspeed_enabled else None
            save_extras(model, output_dir or self.args.output_dir, self.vlft_args, is_peft=isinstance(model, PeftModel),
                        state_dict=gathered)


class _EpochOrderSampler(torch.utils.data.Sampler):
    """Yields the order a function gives for the current epoch (length-grouped batches)."""

    def __init__(self, order, trainer):
        self.order = order
        self.trainer = trainer

    def __len__(self) -> int:
        return len(self.trainer.train_dataset)

    def __iter__(self):
        epoch = int(self.trainer.state.epoch or 0)
        return iter(self.order(epoch))
