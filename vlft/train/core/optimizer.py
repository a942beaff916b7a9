"""The trainer's optimizer (a concern of VlftTrainerMixin, train/core/trainer.py): `OptimizerMixin`."""
from __future__ import annotations

from vlft.errors import VlftError
from vlft.train.core.optim import build_param_groups, groups_table
from vlft.utils import log


class OptimizerMixin:
    """Owns the optimizer: vlft's parameter groups (train/core/optim.py: a learning rate per part, `vision_lr` and
    `merger_lr`, LoRA+ `loraplus_lr_ratio`, no decay on biases and norms) under the optimizer --optim names, or
    DeepSpeed's CPU Adam when ZeRO-Offload steps on the CPU. Reads `self.family` (VlftTrainerMixin sets it); without
    a family the Trainer's own optimizer stands.

    Overrides the public `create_optimizer`; no private Trainer method."""

    def __init__(self, *args, vision_lr: float | None = None, merger_lr: float | None = None,
                 loraplus_lr_ratio: float | None = None, **kwargs):
        self.vision_lr = vision_lr
        self.merger_lr = merger_lr
        self.loraplus_lr_ratio = loraplus_lr_ratio
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        if self.family is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = build_param_groups(opt_model, self.family, lr=self.args.learning_rate,
                                    weight_decay=self.args.weight_decay, vision_lr=self.vision_lr,
                                    merger_lr=self.merger_lr, loraplus_lr_ratio=self.loraplus_lr_ratio)
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

    def _offloads_optimizer(self) -> bool:
        config = self.args.hf_deepspeed_config.config if self.args.deepspeed else {}
        device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        return device in ("cpu", "nvme")
