"""Non-finite steps and weights (a concern of VlftTrainerMixin, train/core/trainer.py): `NonFiniteGuardMixin`."""
from __future__ import annotations

import torch

from vlft.errors import VlftError
from vlft.utils import log


class NonFiniteGuardMixin:
    """Owns the check that a step whose loss or gradients are not finite is caught before the optimizer applies it:
    the run stops naming the step and its records (or skips it, up to --skip_nonfinite_steps), and non-finite
    weights are never saved (`_check_finite_weights`, called by every save: train/core/saving.py). The records are
    named through `RecordIndices`, which wraps the data collator. The same per-step collective carries the agreement
    on a stop signal (`preemption`: train/core/checkpoints.py, PreemptionCallback), so that a step costs one.

    Overrides the public `training_step` (the step's records and loss) and the private `_get_grad_norm` (row in
    train/core/overrides.py)."""

    def __init__(self, *args, **kwargs):
        self._step_records: list[int] = []  # dataset indices of the step in progress
        self._step_finite = None  # all losses of the step in progress finite (a tensor: no sync per micro-step)
        self.nonfinite_skipped = 0
        super().__init__(*args, **kwargs)
        if self.data_collator is not None:
            self.data_collator = RecordIndices(self.data_collator)

    def training_step(self, model, inputs, *args, **kwargs):
        self._step_records.extend(batch_records(inputs))
        loss = super().training_step(model, inputs, *args, **kwargs)
        finite = torch.isfinite(loss.detach()).all()
        self._step_finite = finite if self._step_finite is None else self._step_finite & finite
        return loss

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
        again = f" (again: {allowed} such steps skipped already)" if allowed else ""
        raise NonFiniteError(
            f"step {step}: {what} is not finite{again}; "
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
        trained = [(n, getattr(p, "ds_tensor", p).detach()) for n, p in self.model.named_parameters()
                   if p.requires_grad]
        checks = [torch.isfinite(t).all().to(self.args.device) for _, t in trained]
        finite = torch.stack(checks).tolist() if checks else []  # one device-to-host copy
        bad = [n for (n, _), ok in zip(trained, finite) if not ok]
        from vlft.train.core.checkpoints import any_rank

        if any_rank(bool(bad), self.args.device):
            raise NonFiniteError(f"refusing to save {what}: trainable weights are not finite ({', '.join(bad[:3])}); "
                                 "the checkpoints already written were left as they are")


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

