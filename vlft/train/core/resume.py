"""A resumed run and its identity (a concern of VlftTrainerMixin, train/core/trainer.py): `ResumeMixin`."""
from __future__ import annotations

import torch

from vlft.errors import VlftError
from vlft.models.freezing import is_lora_param
from vlft.run_dir import NON_LORA_FILE, bare_name, read_non_lora
from vlft.utils import log


class ResumeMixin:
    """Owns what a resume restores and checks: the run's identity (`identity`, written with every save and compared
    by --resume_from_checkpoint: train/core/checkpoints.py), the fully trained non-LoRA weights next to a PEFT
    adapter, full fine-tuning weights loaded with every key checked, and --load_best_model_at_end loading the best
    checkpoint the same way.

    Overrides the private `_load_from_checkpoint` and `_load_best_model` (rows in train/core/overrides.py)."""

    def identity(self) -> dict:
        """This run's resume identity (train/core/checkpoints.py: run_identity)."""
        from vlft.run_dir import trained_record
        from vlft.train.core.checkpoints import run_identity

        model = self.accelerator.unwrap_model(self.model)
        return run_identity(self.vlft_args, records=len(self.train_dataset) if self.train_dataset is not None else 0,
                            trained=trained_record(model), world_size=self.args.world_size,
                            model_config=getattr(model, "config", None))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """HF's resume of a PEFT model loads the adapter only: the weights trained fully next to it (merger,
        unfrozen blocks; non_lora_trainables.safetensors) would restart from the base model. Restored here, in
        place (the optimizer and a DPO reference keep their tensors)."""
        from peft import PeftModel

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        peft = isinstance(target, PeftModel)
        if not self.is_fsdp_enabled and not peft and hasattr(target, "config"):  # full fine-tuning
            _load_full_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled or not peft:  # sharded parameters (FSDP): not vlft's path; DeepSpeed restores the
            return  # whole module itself
        expected = {bare_name(n) for n, p in target.named_parameters() if p.requires_grad and not is_lora_param(n)}
        if not expected:
            return
        saved = read_non_lora(resume_from_checkpoint)
        if saved.keys() != expected:
            missing, extra = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
            raise VlftError(f"cannot resume from {resume_from_checkpoint}: its {NON_LORA_FILE} does "
                            f"not hold this run's fully trained weights (missing {missing[:4]}, unexpected "
                            f"{extra[:4]}); resume with the flags that run was started with")
        params = {bare_name(n): p for n, p in target.named_parameters()}
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def _load_best_model(self) -> None:
        """--load_best_model_at_end: load the best checkpoint the way a resume does (`_load_from_checkpoint`).
        HF's own path loads a PEFT model's adapter only, so the weights trained fully next to it (merger, unfrozen
        blocks: non_lora_trainables.safetensors) would stay those of the last step and the final save would mix
        two steps; and it loads a full fine-tuning checkpoint with strict=False, which matches none of the hub
        layout's keys (`_load_full_weights` says why). Under DeepSpeed (the engine restores the whole module from
        its own checkpoint) and FSDP, HF's path stands."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        log(f"loading the best checkpoint, {best} ({self.args.metric_for_best_model} {self.state.best_metric:.6g})")
        self._load_from_checkpoint(best)


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
