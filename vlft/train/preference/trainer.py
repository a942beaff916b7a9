"""The reference machinery of the preference stages, one home: `ReferenceTrainerMixin` goes before vlft's trainer
mixin on HF's Trainer,

    class DPOTrainer(ReferenceTrainerMixin, VlftTrainerMixin, Trainer): ...

and gives a stage its policy log-probs (one forward: train/preference/logprobs.py), its reference log-probs (a live
reference from train/preference/reference.py, or the precomputed `ReferenceCache`, filled here before the first
optimizer step), the resume identity with the media's contents and the throughput count of a batch whose pictures
are encoded once. The stage keeps only its loss and its metrics.

A batch holds `ref_columns * B` rows, [side 0 rows; side 1 rows; ...] (DPO: [chosen; rejected]), and
`batch[index_key]` [B], each item's index in the training set; the cache holds one row per item and one column per
side. A stage whose loss is reference-free (ORPO, SimPO, CPO) says so with `needs_reference` and gets no reference
at all: nothing is loaded, made, precomputed or swapped.
"""
from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from vlft.errors import VlftError
from vlft.train.preference.logprobs import MEDIA_COPIES, completion_log_probs, picture_sources
from vlft.train.preference.reference import AdaptersOff, FrozenCopy, ReferenceCache
from vlft.utils import log


class _PrecomputeReference(TrainerCallback):
    """Fills the trainer's ReferenceCache when training begins (after a resume's checkpoint load, before step 1)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.precompute_reference(resumed=state.global_step > 0)


class ReferenceTrainerMixin:
    """See the module docstring. Keyword arguments on top of the other mixins':

    reference: train/preference/reference.py's AdaptersOff or FrozenCopy; None with `ref_cache` (full fine-tuning
        with precomputed log-probs: the policy before its first step is the reference) or when `needs_reference`
        is False.
    ref_cache: a ReferenceCache (--precompute_ref_log_probs): filled (or loaded) when training begins, before the
        first optimizer step, then the only source of reference log-probs.
    media_sha256: the training items' media contents (train/core/checkpoints.py: `media_digest`), recorded in the
        resume identity so that a resume on changed pictures is refused, naming them.

    ValueError when the stage needs a reference and gets neither, or is reference-free and gets one."""

    index_key = "pair_index"  # batch key: each item's index in the training set, [B]
    ref_columns = 2  # rows per item in a batch (and columns of the cache): [side0 rows; side1 rows]
    items_name = "items"  # what the log calls the training items (DPO: "pairs")

    def __init__(self, *args, reference=None, ref_cache: ReferenceCache | None = None,
                 media_sha256: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.needs_reference and reference is None and ref_cache is None:
            raise ValueError(f"{type(self).__name__} needs a reference or a reference cache")
        if not self.needs_reference and (reference is not None or ref_cache is not None):
            raise ValueError(f"{type(self).__name__}: this loss is reference-free; pass no reference and no cache")
        if ref_cache is not None and ref_cache.columns != self.ref_columns:
            raise ValueError(f"the reference cache has {ref_cache.columns} columns, the stage {self.ref_columns}")
        self.reference = reference
        self.ref_cache = ref_cache
        self.media_sha256 = media_sha256
        # the preference losses are means over this micro-batch's items: the Trainer divides them by the
        # accumulation steps and must not hand them a token count
        self.model_accepts_loss_kwargs = False
        if ref_cache is not None:
            self.add_callback(_PrecomputeReference(self))

    @property
    def needs_reference(self) -> bool:
        """False when the stage's loss is reference-free (the stage overrides; the default is True)."""
        return True

    def identity(self) -> dict:
        """The resume identity (train/core/checkpoints.py: run_identity) with the media's contents."""
        return {**super().identity(), "media_sha256": self.media_sha256}

    def count_batch(self, inputs: dict) -> None:
        """With --encode_vision_once the tower sees each distinct picture once: its patches are counted once."""
        if not getattr(self.args, "encode_vision_once", False):
            return super().count_batch(inputs)
        counted = dict(inputs)
        for _, _, grid_key, copies_key in MEDIA_COPIES:
            sources = picture_sources(counted, copies_key, grid_key)
            if sources:
                counted[grid_key] = counted[grid_key][[j for j, s in enumerate(sources) if s == j]]
        self.counts.add(counted)

    # ------------------------------------------------------------------ log-probs
    def sequence_log_probs(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, M] x [N, M] -> [N]: each row's completion log-prob (nats), the sum over its masked tokens. A stage
        that weighs tokens otherwise (DPO's --ld_alpha) overrides; policy and reference both go through here."""
        return (per_token * mask).sum(dim=1)

    def policy_log_probs(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(per_token [N, M], mask [N, M]) of the batch's completion tokens from one forward of `model`
        (train/preference/logprobs.py `completion_log_probs`; each distinct picture encoded once under
        --encode_vision_once). Gradients flow unless the caller disables them."""
        return completion_log_probs(model, inputs, vision_once=getattr(self.args, "encode_vision_once", False))

    @torch.no_grad()
    def reference_log_probs(self, model, inputs: dict) -> torch.Tensor:
        """[N] reference log-probs of the batch's rows from the live reference (no gradients): the frozen copy, or
        `model` with its adapters off and the starting values of its fully trained parts."""
        ref = self.reference
        if isinstance(ref, FrozenCopy):
            ref.prepare(self)
            per_token, mask = self.policy_log_probs(ref.prepared, inputs)
        elif isinstance(ref, AdaptersOff):
            with ref.active():
                per_token, mask = self.policy_log_probs(model, inputs)
        else:
            raise ValueError("no live reference: the log-probs come from the cache, or the loss needs none")
        return self.sequence_log_probs(per_token, mask)

    def reference_values(self, model, inputs: dict) -> torch.Tensor:
        """[N] reference log-probs of the batch's rows, laid out as the rows ([side0; side1; ...]), on the batch's
        device: from the cache when there is one, else from the live reference."""
        if self.ref_cache is None:
            return self.reference_log_probs(model, inputs)
        rows = self.ref_cache.values[inputs[self.index_key].cpu()]  # [B, ref_columns]
        return rows.t().reshape(-1).to(inputs["labels"].device)

    def precompute_reference(self, *, resumed: bool) -> None:
        """Fill `ref_cache` with one reference pass over the training set (each process an equal share, gathered),
        or load it when this run (or the run it resumes) already wrote it. VlftError on a resume whose cache is
        missing while the policy has moved from the starting model (it cannot stand in for the reference)."""
        cache = self.ref_cache
        if cache.values is not None:
            return
        if cache.load():
            log(f"reference log-probs: reusing {cache.path} ({cache.n_rows} {self.items_name})")
            return
        if resumed and not (isinstance(self.reference, AdaptersOff) and not self.reference.snapshot):
            raise VlftError(f"resuming with --precompute_ref_log_probs, but {cache.path} is missing and the policy "
                            "has moved from the starting model; copy the cache from the first run's output dir")
        n = len(self.train_dataset)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_rank = math.ceil(n / world)  # equal counts: under ZeRO-3 every process must run every forward
        mine = [min(rank + k * world, n - 1) for k in range(per_rank)]
        batch = getattr(self.args, "precompute_ref_batch_size", None) or self.args.per_device_train_batch_size
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        rows = []
        try:
            for start in range(0, per_rank, batch):
                items = [self.train_dataset[i] for i in mine[start:start + batch]]
                inputs = self._prepare_inputs(self.data_collator(items))
                if self.reference is None:  # full fine-tuning before its first step: the policy is the reference
                    with torch.no_grad():
                        logps = self.sequence_log_probs(*self.policy_log_probs(model, inputs))
                else:
                    logps = self.reference_log_probs(model, inputs)
                columns = logps.float().chunk(self.ref_columns)  # each [B]
                rows.append(torch.stack([inputs[self.index_key].float(), *columns], dim=1))
        finally:
            model.train(was_training)
        gathered = self.accelerator.gather(torch.cat(rows)).cpu()
        values = torch.full((n, self.ref_columns), math.nan)
        values[gathered[:, 0].long()] = gathered[:, 1:]
        cache.values, cache.source = values, "computed"
        if self.accelerator.is_main_process:
            cache.save(values)
        self.accelerator.wait_for_everyone()
        log(f"reference log-probs: computed for {n} {self.items_name}, cached in {cache.path}")
        if isinstance(self.reference, FrozenCopy):
            self.reference = None  # not needed any more
