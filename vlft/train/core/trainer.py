"""vlft's additions to a Trainer, as a mixin that goes on any `transformers.Trainer` subclass (HF's own, TRL's
`DPOTrainer` / `GRPOTrainer`):

    class SFTTrainer(VlftTrainerMixin, Trainer): ...
    class DPOTrainer(VlftTrainerMixin, trl.DPOTrainer): ...

`VlftTrainerMixin` is the composition of one mixin per concern, each in its module of train/core/ with a docstring
saying what it owns and which Trainer methods it overrides:

- optimizer.py   OptimizerMixin: parameter groups with a learning rate per part (`vision_lr`, `merger_lr`, LoRA+)
                 and no decay on biases and norms;
- inputs.py      InputsMixin: a given per-epoch order (length-grouped batches) instead of the Trainer's shuffling,
                 and the model's inputs prepared from vlft's batches on the device (train/core/model_inputs.py);
- counting.py    CountingMixin: what trained (non-pad tokens, records, vision patches and attention pairs) and the
                 throughput callback wired to those counts (tokens/s and MFU with the vision tower in it);
- token_loss.py  TokenLossMixin: every trained token of a step weighted alike; a MoE load-balancing loss logged;
- guard.py       NonFiniteGuardMixin: a step whose loss or gradients are not finite is caught before the optimizer
                 applies it (the run stops naming the step and its records, or skips it, up to
                 --skip_nonfinite_steps); non-finite weights are never saved;
- saving.py      SavingMixin: vlft's files in every save (run_dir.py), checkpoints written atomically and the final
                 save staged the same way (train/core/checkpoints.py);
- resume.py      ResumeMixin: the run's identity for resume checks; a resume (and --load_best_model_at_end)
                 restores the non-LoRA weights next to an adapter and checks every key of full weights.

What a run prints and logs is wired here (train/core/callbacks.py: use_log_lines): the progress bar, a readable line
every --log_line_steps steps in place of HF's dict per log, and every log entry in <output_dir>/log.jsonl.

The private Trainer methods these mixins override are listed in train/core/overrides.py, each row naming the
concern module that owns it (tests/train/test_trainer_overrides.py checks both).
"""
from __future__ import annotations

from transformers import Trainer

from vlft.train.core.counting import CountingMixin
from vlft.train.core.guard import NonFiniteError, NonFiniteGuardMixin
from vlft.train.core.inputs import InputsMixin
from vlft.train.core.optimizer import OptimizerMixin
from vlft.train.core.resume import ResumeMixin
from vlft.train.core.saving import SavingMixin
from vlft.train.core.token_loss import TokenLossMixin

__all__ = ["NonFiniteError", "SFTTrainer", "VlftTrainerMixin"]


# The order of the bases is the order of the overrides that several concerns share: `training_step` counts the
# batch (CountingMixin) before it records the step's records and loss (NonFiniteGuardMixin); the work each `__init__`
# does after the Trainer's runs in reverse, so the throughput callback is in place before use_log_lines below.
class VlftTrainerMixin(OptimizerMixin, InputsMixin, CountingMixin, TokenLossMixin, NonFiniteGuardMixin, SavingMixin,
                       ResumeMixin):
    """See the module docstring. Keyword arguments on top of the Trainer's own:

    vlft_args: the resolved arguments, saved as vlft_args.json with every checkpoint.
    family: the model's registry entry (models/registry.py), for the parameter groups and the FLOPs estimate.
    vision_lr, merger_lr: learning rates of the vision tower and the merger(s) (None: the main one).
    loraplus_lr_ratio: LoRA+ (train/core/optim.py): LoRA B matrices learn at this multiple of their part's rate.
    train_order: epoch -> list of dataset indices (length grouping), or None for the Trainer's sampler.
    pixel_norms: (image, video) callables mapping uint8 patch rows to the processor's float values
        (data/pixels.py: PixelNorm); None when the dataset sends float pixels.

    Every private Trainer method overridden here or in a stage's trainer has a row in train/core/overrides.py
    (PRIVATE_TRAINER_OVERRIDES), whose test checks it against the installed transformers. This class itself
    overrides none: each belongs to one concern mixin."""

    def __init__(self, *args, vlft_args: dict | None = None, family=None, **kwargs):
        self.vlft_args = vlft_args or {}  # read by SavingMixin and ResumeMixin
        self.family = family  # read by OptimizerMixin, CountingMixin and SavingMixin
        super().__init__(*args, **kwargs)
        from vlft.train.core.callbacks import ReleaseSharedMemoryCallback, use_log_lines

        # the progress bar (tokens/s in its postfix) without HF's dict, a readable line every --log_line_steps
        # steps, every log entry in <output_dir>/log.jsonl
        use_log_lines(self)
        self.add_callback(ReleaseSharedMemoryCallback())


class SFTTrainer(VlftTrainerMixin, Trainer):
    """The SFT stage: HF's Trainer with vlft's additions (its loss is the model's own causal-LM loss, every trained
    token of a step weighted alike: `TokenLossMixin.compute_loss`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a model that refuses the Trainer's num_items_in_batch gets it applied in compute_loss; the Trainer then
        # counts the step's tokens, and neither divides the loss by the accumulation steps again
        self.token_weighted_loss = not self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = True
