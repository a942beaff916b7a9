"""The language-model loss (a concern of VlftTrainerMixin, train/core/trainer.py): `TokenLossMixin`."""
from __future__ import annotations

import torch


class TokenLossMixin:
    """Owns the training loss's weighting: every trained token of a step weighs the same, whatever the micro-batches
    and processes (`compute_loss` says how), with `token_weighted_loss` set by a stage whose model refuses the
    Trainer's `num_items_in_batch` (SFTTrainer); and a MoE model's load-balancing loss, kept per micro-batch and
    logged as `aux_loss` on each training log line.

    Overrides the public `compute_loss` and `log`; no private Trainer method."""

    def __init__(self, *args, **kwargs):
        self._aux_sum, self._aux_count = None, 0  # MoE load-balancing losses since the last log line
        self.token_weighted_loss = False  # compute_loss divides the token-loss sum by num_items_in_batch itself
        super().__init__(*args, **kwargs)

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
