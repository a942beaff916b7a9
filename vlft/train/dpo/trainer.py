"""The DPO trainer: HF's Trainer with vlft's additions (train/core/trainer.py) and a preference loss.

Why not `VlftTrainerMixin + trl.DPOTrainer`: TRL 1.16's DPOTrainer takes only a `datasets.Dataset`, tokenises
and collates images itself (its own processor call and layout, no video), replaces the model's forward with a fused
LM head, caches reference log-probs by the `datasets` fingerprint, and inlines its losses in `_compute_loss`. vlft
keeps its own data path (one chat encoder, bit-exact pixels, video timing, mRoPE, the distributed dummy media) and
the model's library forward, so the DPO trainer is vlft's: the losses are TRL's formulas under TRL's names
(train/dpo/loss.py, proven equal to TRL's `_compute_loss` in tests/train/test_dpo_loss.py), the metrics TRL's.

A batch (data/dpo.py) holds 2B rows, [chosen; rejected], with labels on the completion tokens. One forward of
the policy gives each row's summed completion log-prob; the reference's come from a second forward without
gradients (train/preference/reference.py) or from the precomputed cache (`ReferenceCache`).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from vlft.errors import VlftError
from vlft.run_dir import REF_CACHE_DIR
from vlft.train.core.trainer import VlftTrainerMixin
from vlft.train.dpo.loss import preference_loss, reward_metrics, sequence_logps
from vlft.train.preference.logprobs import (  # noqa: F401 (encode_vision_once re-exported)
    MEDIA_COPIES,
    completion_log_probs,
    encode_vision_once,
    picture_sources,
)
from vlft.train.preference.reference import AdaptersOff, FrozenCopy
from vlft.utils import log


class ReferenceCache:
    """Reference log-probs of every pair, [N, 2] float32 (chosen, rejected; nats, LD-weighted when --ld_alpha is
    set), in `<output_dir>/ref_log_probs/<key>.pt`. The key (train/dpo/run.py: `reference_cache_key`) covers the data,
    the media's contents, the tokenisation, the model and the media settings: a file with this key holds exactly
    these values. --overwrite_output_dir removes the folder before anything loads (train/core/launch.py)."""

    def __init__(self, directory: str | os.PathLike, key: str, n_pairs: int):
        self.path = Path(directory) / REF_CACHE_DIR / f"{key}.pt"
        self.key = key
        self.n_pairs = n_pairs
        self.values: torch.Tensor | None = None
        self.source: str | None = None  # "loaded" or "computed"

    def load(self) -> bool:
        if not self.path.is_file():
            return False
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved["key"] != self.key or tuple(saved["values"].shape) != (self.n_pairs, 2):
            raise VlftError(f"{self.path} does not hold this run's reference log-probs; delete it to recompute")
        self.values, self.source = saved["values"], "loaded"
        return True

    def save(self, values: torch.Tensor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"key": self.key, "values": values.cpu()}, tmp)
        os.replace(tmp, self.path)  # atomic: a killed run never leaves half a cache


class _PrecomputeReference(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.precompute_reference(resumed=state.global_step > 0)


class DPOTrainer(VlftTrainerMixin, Trainer):
    """vlft's DPO stage. Keyword arguments on top of the mixin's:

    reference: train/preference/reference.py's AdaptersOff or FrozenCopy, or None with `ref_cache`.
    ref_cache: a ReferenceCache when --precompute_ref_log_probs: filled (or loaded) when training begins,
        before the first optimizer step, then the only source of reference log-probs.
    media_sha256: the training pairs' media contents (train/core/checkpoints.py: `media_digest`), recorded in the resume
        identity so that a resume on changed pictures is refused, naming them."""

    def __init__(self, *args, reference=None, ref_cache: ReferenceCache | None = None,
                 media_sha256: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if reference is None and ref_cache is None:
            raise ValueError("DPOTrainer needs a reference or a reference cache")
        self.reference = reference
        self.ref_cache = ref_cache
        self.media_sha256 = media_sha256
        # the loss is a mean over this micro-batch's pairs: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        if ref_cache is not None:
            self.add_callback(_PrecomputeReference(self))

    def identity(self) -> dict:
        """The mixin's resume identity (train/core/checkpoints.py: run_identity) with the media's contents."""
        return {**super().identity(), "media_sha256": self.media_sha256}

    def count_batch(self, inputs: dict) -> None:
        if not self.args.encode_vision_once:
            return super().count_batch(inputs)
        counted = dict(inputs)  # the tower sees each distinct picture once: count its patches once
        for _, _, grid_key, copies_key in MEDIA_COPIES:
            sources = picture_sources(counted, copies_key, grid_key)
            if sources:
                counted[grid_key] = counted[grid_key][[j for j, s in enumerate(sources) if s == j]]
        self.counts.add(counted)

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def reference_log_probs(self, model, inputs: dict) -> torch.Tensor:
        """[N] summed reference log-probs of the batch's rows (no gradients)."""
        ref = self.reference
        if isinstance(ref, FrozenCopy):
            ref.prepare(self)
            per_token, mask = completion_log_probs(ref.prepared, inputs, vision_once=self.args.encode_vision_once)
        else:
            with ref.active():
                per_token, mask = completion_log_probs(model, inputs, vision_once=self.args.encode_vision_once)
        return sequence_logps(per_token, mask, self.args.ld_alpha)

    def precompute_reference(self, *, resumed: bool) -> None:
        """Fill `ref_cache` with one reference pass over the training set (each process a share, gathered), or
        load it when this run (or a resumed one) already wrote it."""
        cache = self.ref_cache
        if cache.values is not None:
            return
        if cache.load():
            log(f"reference log-probs: reusing {cache.path} ({cache.n_pairs} pairs)")
            return
        if resumed and not (isinstance(self.reference, AdaptersOff) and not self.reference.snapshot):
            raise VlftError(f"resuming with --precompute_ref_log_probs, but {cache.path} is missing and the policy "
                            "has moved from the starting model; copy the cache from the first run's output dir")
        n = len(self.train_dataset)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_rank = math.ceil(n / world)  # equal counts: under ZeRO-3 every process must run every forward
        mine = [min(rank + k * world, n - 1) for k in range(per_rank)]
        batch = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        rows = []
        try:
            for start in range(0, per_rank, batch):
                inputs = self._prepare_inputs(self.data_collator([self.train_dataset[i] for i in mine[start:start + batch]]))
                if self.reference is None:  # full fine-tuning before its first step: the policy is the reference
                    with torch.no_grad():
                        per_token, mask = completion_log_probs(model, inputs, vision_once=self.args.encode_vision_once)
                    logps = sequence_logps(per_token, mask, self.args.ld_alpha)
                else:
                    logps = self.reference_log_probs(model, inputs)
                chosen, rejected = logps.float().chunk(2)
                rows.append(torch.stack([inputs["pair_index"].float(), chosen, rejected], dim=1))
        finally:
            model.train(was_training)
        gathered = self.accelerator.gather(torch.cat(rows)).cpu()
        values = torch.full((n, 2), math.nan)
        values[gathered[:, 0].long()] = gathered[:, 1:]
        cache.values, cache.source = values, "computed"
        if self.accelerator.is_main_process:
            cache.save(values)
        self.accelerator.wait_for_everyone()
        log(f"reference log-probs: computed for {n} pairs, cached in {cache.path}")
        if isinstance(self.reference, FrozenCopy):
            self.reference = None  # not needed any more

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        per_token, mask = completion_log_probs(model, inputs, vision_once=self.args.encode_vision_once)
        args = self.args
        logps = sequence_logps(per_token, mask, args.ld_alpha)
        chosen, rejected = logps.chunk(2)
        if self.ref_cache is not None:
            ref = self.ref_cache.values[inputs["pair_index"].cpu()].to(logps.device, logps.dtype)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            ref_chosen, ref_rejected = self.reference_log_probs(model, inputs).to(logps.dtype).chunk(2)
        out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=args.loss_type,
                              loss_weights=args.loss_weights, beta=args.beta, label_smoothing=args.label_smoothing,
                              discopop_tau=args.discopop_tau, completion_lengths=mask.sum(1),
                              completion_mask=mask, per_token_logps=per_token)
        mode = "train" if model.training else "eval"
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, chosen.detach(), rejected.detach())
        for name, value in metrics.items():
            self._metrics[f"{mode}:{name}"].append(self.accelerator.gather_for_metrics(value).float().mean().item())
        return (out.loss, {"chosen_logps": chosen, "rejected_logps": rejected}) if return_outputs else out.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key in [k for k in self._metrics if k.startswith(f"{mode}:")]:
            values = self._metrics.pop(key)
            logs[prefix + key.split(":", 1)[1]] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)
