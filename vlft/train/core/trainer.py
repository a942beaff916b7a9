"""vlft's additions to a Trainer, as a mixin that goes on any `transformers.Trainer` subclass (HF's own, TRL's
`DPOTrainer` / `GRPOTrainer`):

    class SFTTrainer(VlftTrainerMixin, Trainer): ...
    class DPOTrainer(VlftTrainerMixin, trl.DPOTrainer): ...

- parameter groups with a learning rate per part (`vision_lr`, `merger_lr`) and no decay on biases and norms;
- a given per-epoch order (length-grouped batches) instead of the Trainer's shuffling;
- the model's inputs prepared from vlft's batches on the device (train/core/model_inputs.py: uint8 pixels normalised,
  packed rows' per-record positions), so the model keeps its library forward;
- counting of what trained (non-pad tokens, records, vision patches and attention pairs) and the throughput
  callback wired to those counts, so every run logs tokens/s and MFU with the vision tower in it;
- what a run prints and logs (train/core/callbacks.py: use_log_lines): the progress bar, a readable line every
  --log_line_steps steps in place of HF's dict per log, and every log entry in <output_dir>/log.jsonl;
- vlft's files in every save (run_dir.py: fully trained non-LoRA weights, what trained, resolved arguments);
- checkpoints written atomically, with the run's identity for resume checks, and the final save staged the same
  way (train/core/checkpoints.py);
- a step whose loss or gradients are not finite is caught before the optimizer applies it: the run stops naming
  the step and its records (or skips it, up to --skip_nonfinite_steps), and non-finite weights are never saved.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from vlft.errors import VlftError
from vlft.models.freezing import is_lora_param
from vlft.run_dir import (
    CHECKPOINT_PREFIX,
    FINAL_STAGING,
    NON_LORA_FILE,
    STATE_FILE,
    bare_name,
    read_non_lora,
    write_run_files,
)
from vlft.train.core.model_inputs import model_inputs
from vlft.train.core.optim import build_param_groups, groups_table
from vlft.train.core.throughput import ThroughputCallback
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
    loraplus_lr_ratio: LoRA+ (train/core/optim.py): LoRA B matrices learn at this multiple of their part's rate.
    train_order: epoch -> list of dataset indices (length grouping), or None for the Trainer's sampler.
    pixel_norms: (image, video) callables mapping uint8 patch rows to the processor's float values
        (data/pixels.py: PixelNorm); None when the dataset sends float pixels.

    Every private Trainer method overridden here or in a stage's trainer has a row in train/core/overrides.py
    (PRIVATE_TRAINER_OVERRIDES), whose test checks it against the installed transformers."""

    def __init__(self, *args, vlft_args: dict | None = None, family=None, vision_lr: float | None = None,
                 merger_lr: float | None = None, loraplus_lr_ratio: float | None = None, train_order=None,
                 pixel_norms=None, **kwargs):
        self.vlft_args = vlft_args or {}
        self.family = family
        self.vision_lr = vision_lr
        self.merger_lr = merger_lr
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.train_order = train_order
        self.pixel_norms = pixel_norms
        self.counts = TrainCounts()
        self._staging: str | None = None  # where the Trainer writes a checkpoint before it is renamed into place
        self._step_records: list[int] = []  # dataset indices of the step in progress
        self._step_finite = None  # all losses of the step in progress finite (a tensor: no sync per micro-step)
        self.nonfinite_skipped = 0
        self._aux_sum, self._aux_count = None, 0  # MoE load-balancing losses since the last log line
        self.token_weighted_loss = False  # compute_loss divides the token-loss sum by num_items_in_batch itself
        super().__init__(*args, **kwargs)
        if self.data_collator is not None:
            self.data_collator = RecordIndices(self.data_collator)
        c = self.counts
        self.throughput = ThroughputCallback(
            self.model, family, real_tokens=lambda: int(c.tokens), real_samples=lambda: int(c.records),
            vision_tokens=lambda: int(c.patches), vision_pairs=lambda: int(c.pairs))
        # right after DefaultFlowCallback: the figures it adds to a log line reach the reporters and the printer
        self.callback_handler.callbacks.insert(1, self.throughput)
        from vlft.train.core.callbacks import ReleaseSharedMemoryCallback, use_log_lines

        # the progress bar (tokens/s in its postfix) without HF's dict, a readable line every --log_line_steps
        # steps, every log entry in <output_dir>/log.jsonl
        use_log_lines(self)
        self.add_callback(ReleaseSharedMemoryCallback())

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

    def _get_train_sampler(self, *args, **kwargs):
        if self.train_order is None:
            return super()._get_train_sampler(*args, **kwargs)
        return _EpochOrderSampler(self.train_order, self)

    def count_batch(self, inputs: dict) -> None:
        """What a batch adds to the throughput counts (a stage whose model sees other than the batch overrides)."""
        self.counts.add(inputs)

    def training_step(self, model, inputs, *args, **kwargs):
        self.count_batch(inputs)
        self._step_records.extend(batch_records(inputs))
        loss = super().training_step(model, inputs, *args, **kwargs)
        finite = torch.isfinite(loss.detach()).all()
        self._step_finite = finite if self._step_finite is None else self._step_finite & finite
        return loss

    # --- the language-model loss: every trained token weighs the same; MoE load-balancing loss --------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The step's loss with every trained token weighted alike, whatever the micro-batches and processes; when the
        model also returns a load-balancing loss (`outputs.aux_loss`: MoE models with `output_router_logits`,
        --router_aux_loss_coef), its value is kept for the log line (`log`: aux_loss, the mean over the logging
        window's micro-batches and processes, like loss).

        Models whose forward takes the Trainer's `num_items_in_batch` (the step's trained tokens over all micro-batches
        and, with `average_tokens_across_devices`, all processes) divide their token-loss sum by it themselves: Qwen2-VL
        and Qwen2.5-VL. Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 declare `accepts_loss_kwargs = False` (their forward passes
        its keyword arguments on to the vision tower too), and the Trainer would then average per-micro-batch means, so
        that under gradient accumulation or several processes a token in a micro-batch with few trained tokens weighs
        more than one with many, unlike one batch holding them all. For those (`token_weighted_loss`) the model's mean
        is turned back into its micro-batch's sum, `mean x local`, and divided by `num_items_in_batch`, exactly what the
        other models compute (transformers' ForCausalLMLoss: `local` = labels[..., 1:] != -100); times the processes,
        as the Trainer scales such losses for the gradient all-reduce's mean. A load-balancing term the model added
        (coef x aux, a mean over its micro-batch's tokens) stays a per-micro-batch term, divided by the accumulation
        steps as the Trainer divides every per-micro-batch loss. Evaluation keeps the model's own per-batch mean."""
        rescale = self.token_weighted_loss and num_items_in_batch is not None and model.training and "labels" in inputs
        if not rescale:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        else:
            outputs = model(**inputs)
            loss = outputs["loss"]
            aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
            aux_term = 0.0
            if aux is not None:
                config = self.accelerator.unwrap_model(model).config
                text = getattr(config, "text_config", None) or config
                aux_term = text.router_aux_loss_coef * aux.to(loss.device)
            local = (inputs["labels"][..., 1:] != -100).sum()
            total = torch.as_tensor(num_items_in_batch, device=loss.device)
            loss = (loss - aux_term) * local / total.clamp(min=1) + aux_term / self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if aux is not None and model.training:
            aux = torch.as_tensor(aux, dtype=torch.float32, device=loss.device).detach()
            self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux
            self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._aux_count:  # a training log line (every process logs it together)
            mean = (self._aux_sum / self._aux_count).reshape(1)
            logs["aux_loss"] = self.accelerator.gather(mean).mean().item()
            self._aux_sum, self._aux_count = None, 0
        super().log(logs, *args, **kwargs)

    # --- non-finite steps ---------------------------------------------------------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer asks for the gradient norm right before `optimizer.step()` (under DeepSpeed, whose engine
        steps inside backward, right after it): the one place per step where the loss and the gradients of the
        whole step are known. A non-finite one stops the run here (or skips the step: see `_nonfinite_step`)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        loss_finite = self._step_finite if self._step_finite is not None else torch.tensor(True)
        norm_finite = torch.tensor(True) if grad_norm is None else torch.isfinite(torch.as_tensor(grad_norm)).all()
        if self.args.fp16:  # an overflowing fp16 step is the loss scaler's to skip (and to lower its scale for)
            norm_finite = torch.tensor(True)
        records, self._step_records, self._step_finite = self._step_records, [], None
        from vlft.train.core.checkpoints import any_ranks

        preemption = self.preemption
        # one collective per step for both agreements: a non-finite step, and a stop signal (PreemptionCallback)
        bad_loss, bad_norm, stop = any_ranks([~loss_finite, ~norm_finite,
                                              preemption is not None and preemption.requested is not None],
                                             self.args.device)
        if preemption is not None:
            preemption.agreed = stop
        if bad_loss or bad_norm:
            self._nonfinite_step(model, records, not bad_loss, grad_norm)
        return grad_norm

    @property
    def preemption(self):
        """The run's PreemptionCallback (train/core/checkpoints.py), or None."""
        from vlft.train.core.checkpoints import PreemptionCallback

        return next((c for c in self.callback_handler.callbacks if isinstance(c, PreemptionCallback)), None)

    def _nonfinite_step(self, model, records: list[int], loss_finite: bool, grad_norm) -> None:
        step = self.state.global_step + 1  # the step being taken, numbered as the logs number it
        labels = self.describe_records(_gather_records(records))
        what = "the loss" if not loss_finite else f"the gradient norm ({float(torch.as_tensor(grad_norm)):g})"
        allowed = getattr(self.args, "skip_nonfinite_steps", 0)
        if self.nonfinite_skipped < allowed and not self.is_deepspeed_enabled:
            for p in model.parameters():
                p.grad = None  # torch optimizers leave a parameter without a gradient untouched
            self.nonfinite_skipped += 1
            log(f"step {step}: {what} is not finite; step skipped ({self.nonfinite_skipped} of "
                f"--skip_nonfinite_steps {allowed}); records in its batch: {labels}")
            return
        from vlft.train.core.checkpoints import latest_checkpoint

        last = latest_checkpoint(self.args.output_dir)
        kept = f"the last checkpoint, {last}, holds finite weights" if last else "no checkpoint had been written"
        hint = ("" if allowed or self.is_deepspeed_enabled else
                " To skip such steps instead, pass --skip_nonfinite_steps N.")
        applied = ("DeepSpeed had already applied the step (its engine steps inside backward), the run stopped"
                   if self.is_deepspeed_enabled else "the run stopped before the optimizer applied it")
        raise NonFiniteError(
            f"step {step}: {what} is not finite{' (again: ' + str(allowed) + ' such steps skipped already)' if allowed else ''}; "
            f"{applied} and nothing was saved after it ({kept}). Records in "
            f"this step's batch: {labels}. Check those records, lower --learning_rate, or keep --max_grad_norm set; "
            f"resume with --resume_from_checkpoint latest.{hint}")

    def describe_records(self, indices: list[int]) -> str:
        """'record 12 (id "a7")' for each dataset index of a batch (the record's index and id in its data file)."""
        dataset = self.train_dataset
        base = getattr(dataset, "dataset", dataset) if hasattr(dataset, "packs") else dataset
        samples = getattr(base, "samples", None)
        out = []
        for i in indices:
            sample = samples[i] if samples is not None and 0 <= i < len(samples) else None
            if sample is None:
                out.append(f"item {i}")
            else:
                out.append(f"record {sample.index}" + (f" (id {sample.id!r})" if getattr(sample, "id", None) else ""))
        return ", ".join(out) or "(unknown)"

    def _check_finite_weights(self, what: str) -> None:
        """Refuse to write non-finite weights (any rank's trainable parameters or their ZeRO-3 partitions)."""
        trained = [(n, getattr(p, "ds_tensor", p).detach()) for n, p in self.model.named_parameters() if p.requires_grad]
        checks = [torch.isfinite(t).all().to(self.args.device) for _, t in trained]
        finite = torch.stack(checks).tolist() if checks else []  # one device-to-host copy
        bad = [n for (n, _), ok in zip(trained, finite) if not ok]
        from vlft.train.core.checkpoints import any_rank

        if any_rank(bool(bad), self.args.device):
            raise NonFiniteError(f"refusing to save {what}: trainable weights are not finite ({', '.join(bad[:3])}); "
                                 "the checkpoints already written were left as they are")

    # --- atomic checkpoints -------------------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written under <output_dir>/.vlft-staging and renamed into place when every
        rank has finished; then the rotation of --save_total_limit (train/core/checkpoints.py says why)."""
        from transformers.trainer_utils import rotate_checkpoints

        from vlft.train.core.checkpoints import STAGING_DIR, any_rank, barrier, publish_checkpoint, remove_if_empty, save_failed

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        self._check_finite_weights(name)
        staging = run_dir / STAGING_DIR
        self._staging = str(staging)
        failure = None
        try:
            super()._save_checkpoint(model, trial)
            # HF names the best checkpoint under the folder it saved into (staging): name its final place, in
            # memory and in this checkpoint's state file (a resume reads it from there)
            best_step = self.state.best_global_step
            best = run_dir / f"{CHECKPOINT_PREFIX}{best_step}" if best_step else None
            if best is not None and (best.name == name or best.exists()) and \
                    self.state.best_model_checkpoint != str(best):
                self.state.best_model_checkpoint = str(best)
                if self.args.should_save:
                    self.state.save_to_json(str(staging / name / STATE_FILE))
            self.save_process_state(staging / name)
        except OSError as err:
            failure = err
        finally:
            self._staging = None
        if any_rank(failure is not None, self.args.device):
            if self.args.should_save:
                shutil_rmtree(staging / name)
                remove_if_empty(staging)
            raise save_failed(failure or OSError("another process could not write its part"), name, run_dir)
        barrier()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        barrier()

    def save_process_state(self, checkpoint: Path) -> None:
        """Write what this process alone holds and a resume needs (a stage with such state overrides; every rank
        calls it, into the staged checkpoint folder, so the file is published with the checkpoint or not at all)."""

    def save_final(self, output_dir: str) -> None:
        """The end-of-run save, staged and then moved into `output_dir` (see train/core/checkpoints.py)."""
        from vlft.train.core.checkpoints import STAGING_DIR, any_rank, barrier, publish_final, remove_if_empty, save_failed

        self._check_finite_weights("the final model")
        out = Path(output_dir)
        staged = out / STAGING_DIR / FINAL_STAGING
        if self.args.should_save:
            shutil_rmtree(staged)
        barrier()
        failure = None
        try:
            self.save_model(str(staged))
        except OSError as err:
            failure = err
        if any_rank(failure is not None, self.args.device):
            if self.args.should_save:
                shutil_rmtree(staged)
                remove_if_empty(staged.parent)
            raise save_failed(failure or OSError("another process could not write its part"), "the final model", out)
        barrier()
        if self.args.should_save:
            from vlft.models.extra_keys import carry_into_final_save

            carry_into_final_save(self.vlft_args.get("model_id"), staged, self.family)  # what load dropped: mtp.*
            publish_final(staged, out)
        barrier()

    def identity(self) -> dict:
        """This run's resume identity (train/core/checkpoints.py: run_identity)."""
        from vlft.run_dir import trained_record
        from vlft.train.core.checkpoints import run_identity

        model = self.accelerator.unwrap_model(self.model)
        return run_identity(self.vlft_args, records=len(self.train_dataset) if self.train_dataset is not None else 0,
                            trained=trained_record(model), world_size=self.args.world_size,
                            model_config=getattr(model, "config", None))

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            gathered = state_dict if self.is_deepspeed_enabled else None
            write_run_files(model, output_dir or self.args.output_dir, self.vlft_args,
                            is_peft=isinstance(model, PeftModel), state_dict=gathered)
            from vlft.train.core.checkpoints import write_identity

            write_identity(output_dir or self.args.output_dir, self.identity())


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


class NonFiniteError(VlftError):
    """A step's loss or gradients, or the weights about to be saved, are not finite."""


def batch_records(inputs) -> list[int]:
    """Dataset indices of the records in a batch of vlft's collators: `record` (SFT, packed rows: every record of
    every row), `pair_index` (preference pairs), or a list of items with `record` (GRPO prompts)."""
    if isinstance(inputs, dict):
        value = inputs.get("record", inputs.get("pair_index"))
        return [int(v) for v in value.tolist()] if isinstance(value, torch.Tensor) else list(value or [])
    if isinstance(inputs, list):
        return [int(it["record"]) for it in inputs if isinstance(it, dict) and "record" in it]
    return []


class RecordIndices:
    """Wraps a collator: the batch also carries `record`, the dataset indices of its records (items, or packs of
    items, with a `record` key), so that a step that goes wrong can name them. Other batches pass unchanged."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        batch = self.collator(items)
        if isinstance(batch, dict) and "record" not in batch and "pair_index" not in batch:
            flat = [it for group in items for it in (group if isinstance(group, list) else [group])]
            if flat and all(isinstance(it, dict) and "record" in it for it in flat):
                batch["record"] = torch.tensor([int(it["record"]) for it in flat])
        return batch


def _gather_records(records: list[int]) -> list[int]:
    """Every process's record indices of this step (only called when a step went wrong)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    return [i for part in parts for i in part]


def shutil_rmtree(path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class SFTTrainer(VlftTrainerMixin, Trainer):
    """The SFT stage: HF's Trainer with vlft's additions (its loss is the model's own causal-LM loss, every trained
    token of a step weighted alike: `VlftTrainerMixin.compute_loss`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a model that refuses the Trainer's num_items_in_batch gets it applied in compute_loss; the Trainer then
        # counts the step's tokens, and neither divides the loss by the accumulation steps again
        self.token_weighted_loss = not self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = True


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
