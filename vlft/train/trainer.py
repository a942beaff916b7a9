"""vlft's additions to a Trainer, as a mixin that goes on any `transformers.Trainer` subclass (HF's own, TRL's
`DPOTrainer` / `GRPOTrainer`):

    class SFTTrainer(VlftTrainerMixin, Trainer): ...
    class DPOTrainer(VlftTrainerMixin, trl.DPOTrainer): ...

- parameter groups with a learning rate per part (`vision_lr`, `merger_lr`) and no decay on biases and norms;
- a given per-epoch order (length-grouped batches) instead of the Trainer's shuffling;
- the model's inputs prepared from vlft's batches on the device (train/model_inputs.py: uint8 pixels normalised,
  packed rows' per-record positions), so the model keeps its library forward;
- counting of what trained (non-pad tokens, records, vision patches and attention pairs) and the throughput
  callback wired to those counts, so every run logs tokens/s and MFU with the vision tower in it;
- vlft's files in every save (run_dir.py: fully trained non-LoRA weights, what trained, resolved arguments).
"""
from __future__ import annotations

import torch
from transformers import Trainer

from vlft.errors import VlftError
from vlft.models.freezing import is_lora_param
from vlft.run_dir import bare_name, read_non_lora, write_run_files
from vlft.train.model_inputs import model_inputs
from vlft.train.optim import build_param_groups, groups_table
from vlft.train.throughput import ThroughputCallback
from vlft.utils import log


class TrainCounts:
    """What this process trained on, accumulated at every training step. The sums stay tensors on the batch's
    device (the Trainer's data loader may already have moved it there): counting never waits for the GPU; the
    throughput callback reads them (`int(...)`) only when it logs."""

    def __init__(self):
        self.tokens = self.records = self.patches = self.pairs = 0

    def add(self, inputs: dict) -> None:
        """Count one batch as vlft's collators build it: `attention_mask` (padded; with `pair_index`, a preference
        batch of two rows per record) or `pack_layout` (packed rows: per segment tokens, images, videos, is_record),
        and the `*_grid_thw` rows of its images and videos."""
        if "pack_layout" in inputs:
            layout = inputs["pack_layout"]
            self.tokens = self.tokens + (layout[..., 0] * layout[..., 3]).sum()
            self.records = self.records + layout[..., 3].sum()
        elif "attention_mask" in inputs:
            self.tokens = self.tokens + inputs["attention_mask"].sum()
            # preference batches (data/dpo.py) hold two rows per record: a record is a pair there
            rows = inputs["pair_index"] if "pair_index" in inputs else inputs["attention_mask"]
            self.records = self.records + rows.shape[0]
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = inputs.get(key)
            if grid is not None:
                frame = grid[:, 1] * grid[:, 2]  # the tower attends within one temporal patch of one image / video
                self.patches = self.patches + (grid[:, 0] * frame).sum()
                self.pairs = self.pairs + (grid[:, 0] * frame * frame).sum()


class VlftTrainerMixin:
    """See the module docstring. Keyword arguments on top of the Trainer's own:

    vlft_args: the resolved arguments, saved as vlft_args.json with every checkpoint.
    family: the model's registry entry (models/registry.py), for the parameter groups and the FLOPs estimate.
    vision_lr, merger_lr: learning rates of the vision tower and the merger(s) (None: the main one).
    train_order: epoch -> list of dataset indices (length grouping), or None for the Trainer's sampler.
    pixel_norms: (image, video) callables mapping uint8 patch rows to the processor's float values
        (data/pixels.py: PixelNorm); None when the dataset sends float pixels."""

    def __init__(self, *args, vlft_args: dict | None = None, family=None, vision_lr: float | None = None,
                 merger_lr: float | None = None, train_order=None, pixel_norms=None, **kwargs):
        self.vlft_args = vlft_args or {}
        self.family = family
        self.vision_lr = vision_lr
        self.merger_lr = merger_lr
        self.train_order = train_order
        self.pixel_norms = pixel_norms
        self.counts = TrainCounts()
        super().__init__(*args, **kwargs)
        c = self.counts
        self.throughput = ThroughputCallback(
            self.model, family, real_tokens=lambda: int(c.tokens), real_samples=lambda: int(c.records),
            vision_tokens=lambda: int(c.patches), vision_pairs=lambda: int(c.pairs))
        # right after DefaultFlowCallback: the figures it adds to a log line reach the reporters and the printer
        self.callback_handler.callbacks.insert(1, self.throughput)
        from vlft.train.callbacks import ReleaseSharedMemoryCallback

        self.add_callback(ReleaseSharedMemoryCallback())

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        if self.family is None:
            return super().create_optimizer(model)
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

    def _offloads_optimizer(self) -> bool:
        config = self.args.hf_deepspeed_config.config if self.args.deepspeed else {}
        device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        return device in ("cpu", "nvme")

    def _get_train_sampler(self, *args, **kwargs):
        if self.train_order is None:
            return super()._get_train_sampler(*args, **kwargs)
        return _EpochOrderSampler(self.train_order, self)

    def count_batch(self, inputs: dict) -> None:
        """What a batch adds to the throughput counts (a stage whose model sees other than the batch overrides)."""
        self.counts.add(inputs)

    def training_step(self, model, inputs, *args, **kwargs):
        self.count_batch(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        image_norm, video_norm = self.pixel_norms or (None, None)
        return model_inputs(inputs, self.accelerator.unwrap_model(self.model), image_norm=image_norm,
                            video_norm=video_norm)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """HF's resume of a PEFT model loads the adapter only: the weights trained fully next to it (merger,
        unfrozen blocks; non_lora_trainables.safetensors) would restart from the base model. Restored here, in
        place (the optimizer and a DPO reference keep their tensors)."""
        from peft import PeftModel

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_fsdp_enabled or isinstance(target, PeftModel) or not hasattr(target, "config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            _load_full_weights(target, resume_from_checkpoint)
            return
        if self.is_fsdp_enabled:  # sharded parameters: not vlft's path (DeepSpeed restores the whole module itself)
            return
        if not isinstance(target, PeftModel):
            return
        expected = {bare_name(n) for n, p in target.named_parameters() if p.requires_grad and not is_lora_param(n)}
        if not expected:
            return
        saved = read_non_lora(resume_from_checkpoint)
        if saved.keys() != expected:
            missing, extra = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
            raise VlftError(f"cannot resume from {resume_from_checkpoint}: its non_lora_trainables.safetensors does "
                            f"not hold this run's fully trained weights (missing {missing[:4]}, unexpected "
                            f"{extra[:4]}); resume with the flags that run was started with")
        params = {bare_name(n): p for n, p in target.named_parameters()}
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            gathered = state_dict if self.is_deepspeed_enabled else None
            write_run_files(model, output_dir or self.args.output_dir, self.vlft_args,
                            is_peft=isinstance(model, PeftModel), state_dict=gathered)


def _load_full_weights(model, checkpoint: str) -> None:
    """Load a full fine-tuning checkpoint's weights into `model`, in place, every key checked.

    Why not the Trainer's own resume: transformers 5 saves Qwen-VL checkpoints in the original hub layout
    (`save_pretrained(save_original_format=True)`: `model.layers.*`, not `model.language_model.layers.*`) and
    its resume loads them with `load_state_dict(strict=False)`, which matches none of the language model's keys:
    the run silently restarts from the base weights with the checkpoint's optimizer (seen on transformers 5.24:
    a resumed full fine-tuning run's step-4 loss 7.87 where the straight run had 7.97). `from_pretrained` applies
    the model's key conversion; its weights are then copied with `strict=True`."""
    import torch

    fresh = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        result = model.load_state_dict(fresh.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlftError(f"cannot resume from {checkpoint}: its weights do not fit this model (missing "
                        f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}); resume with the "
                        "--model_id and flags that run was started with")
    del fresh


class SFTTrainer(VlftTrainerMixin, Trainer):
    """The SFT stage: HF's Trainer with vlft's additions (its loss is the model's own causal-LM loss)."""


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
