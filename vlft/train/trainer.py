"""Thin Trainer subclass: counts real (non-pad) tokens and saves vlft's extras with every save."""
from __future__ import annotations

import torch
from transformers import Trainer

from vlft.train.checkpoint import save_extras


class VlftTrainer(Trainer):
    def __init__(self, *args, vlft_args: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vlft_args = vlft_args or {}
        self.real_tokens = torch.zeros((), dtype=torch.long)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Accumulated on the device without .item(), so counting never forces a GPU sync.
        mask = inputs["attention_mask"]
        self.real_tokens = self.real_tokens.to(mask.device) + mask.sum()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            save_extras(model, output_dir or self.args.output_dir, self.vlft_args, is_peft=isinstance(model, PeftModel))
