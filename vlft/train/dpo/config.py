"""The DPO stage's flags: `DPOConfig` (TrainingArguments + vlft's additions + the stage's own) and `GROUPS`, the
argument groups `vlft dpo` parses."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from vlft.train.core.arguments import VlftArgumentsMixin, stage_groups


@dataclass
class DPOConfig(VlftArgumentsMixin, TrainingArguments):
    """HF TrainingArguments with vlft's additions and the DPO stage's flags, under TRL's `DPOConfig` names and
    defaults (trl 1.16) for what vlft implements: the loss (train/dpo/loss.py), the reference, truncation; and the
    pair stage's reference-free losses under `CPOConfig`'s / `ORPOConfig`'s names and defaults (--loss_type cpo,
    cpo_hinge, cpo_ipo, simpo, orpo; --cpo_alpha, --simpo_gamma; --beta is ORPO's lambda)."""

    stage_key = "dpo"
    stage_name = "DPO"
    router_aux_loss_joins = False

    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far the policy may move from the reference "
                                                       "(higher = closer); CPO's and SimPO's beta; ORPO's lambda "
                                                       "(the odds-ratio term's weight)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Preference loss(es), TRL's names: sigmoid (DPO), hinge, ipo, exo_pair, nca_pair, robust, "
                          "bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm. "
                          "Several (space- or comma-separated) are summed with --loss_weights; sigmoid,sft is RPO. "
                          "Reference-free (no reference model is loaded; one alone): orpo (ORPO), simpo (SimPO, plus "
                          "--cpo_alpha x NLL as TRL; --cpo_alpha 0 for the paper's), cpo (CPO), cpo_hinge, cpo_ipo "
                          "(TRL CPOTrainer's hinge and ipo)."},
    )
    cpo_alpha: float = field(
        default=1.0, metadata={"help": "cpo, cpo_hinge, cpo_ipo, simpo: weight of the NLL on the chosen answers added "
                                       "to the loss (TRL's CPOConfig default 1.0; 0 = pure SimPO)."}
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "simpo: the target reward margin gamma (TRL's default 0.5)."}
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per --loss_type (default: 1 each)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Probability that a pair's labels are flipped (robust, exo_pair, aot)."}
    )
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO: weight of the longer answer's tokens past the shorter one's length "
                                        "(arXiv 2409.06411); unset = plain sums."}
    )
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs once before training, cache them in the run directory "
                          "(reused on resume) and keep no reference model in memory."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Pairs per forward of the reference pass (default: the train batch size)."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "A pair longer than --max_seq_length: keep_start cuts the answers from their end; drop "
                          "leaves the pair out (counted). The prompt is never cut.", "choices": ["keep_start", "drop"]},
    )
    encode_vision_once: bool = field(
        default=True, metadata={"help": "Run the vision tower once per pair, not once per answer: chosen and rejected "
                                        "share the prompt's pictures (same loss and gradients, proven in the tests)."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off, so that policy and reference agree at step 0."}
    )
    dpo_loss: str | None = field(default=None, metadata={"help": "2U1 spelling of --loss_type."})

    def __post_init__(self):
        self.loss_type = [t.strip() for value in self.loss_type for t in str(value).split(",") if t.strip()]
        super().__post_init__()

    def problems(self) -> list[str]:
        from vlft.train.dpo.loss import check_loss_config

        errors = super().problems() + check_loss_config(self.loss_type, self.loss_weights, self.beta, self.label_smoothing)
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            errors.append(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            errors.append("--precompute_ref_batch_size must be >= 1")
        if self.cpo_alpha < 0:
            errors.append(f"--cpo_alpha must be >= 0 (got {self.cpo_alpha}): it weighs the NLL of the chosen answers")
        errors += self._reference_free_problems()
        return errors

    def _reference_free_problems(self) -> list[str]:
        """The flags that only matter with a reference model, refused with a reference-free --loss_type."""
        from vlft.train.dpo.loss import REFERENCE_FREE

        free = next((t for t in self.loss_type if t in REFERENCE_FREE), None)
        if free is None:
            return []
        why = f"--loss_type {free} is reference-free: no reference model is loaded or computed"
        errors = []
        if self.precompute_ref_log_probs:
            errors.append(f"--precompute_ref_log_probs: {why}, so there is nothing to precompute; drop the flag")
        if self.precompute_ref_batch_size is not None:
            errors.append(f"--precompute_ref_batch_size: {why}, so there is no reference pass to size; drop the flag")
        if self.ld_alpha is not None:
            errors.append(f"--ld_alpha weighs DPO's summed log-ratios against a reference; {why} (simpo, orpo and "
                          "cpo_ipo already normalise by length); drop --ld_alpha")
        return errors


GROUPS = stage_groups(DPOConfig)
