"""What a run directory (and every checkpoint-N in it) holds besides the weights: the trainable
non-LoRA weights of a LoRA run, and the resolved arguments, so merge/predict need only one path."""
from __future__ import annotations

import json
import os

from vlft.config import ARGS_FILE
from vlft.models.freezing import is_lora_param

NON_LORA_FILE = "non_lora_trainables.safetensors"


def non_lora_trainables(model) -> dict:
    """Trainable weights that are not LoRA tensors (merger, unfrozen tower...), keyed by the bare model's
    parameter names (PEFT's `base_model.model.` prefix removed)."""
    return {
        name.removeprefix("base_model.model."): param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad and not is_lora_param(name)
    }


def save_extras(model, output_dir: str, args: dict, *, is_peft: bool) -> None:
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    if is_peft:
        tensors = non_lora_trainables(model)
        if tensors:
            save_file(tensors, os.path.join(output_dir, NON_LORA_FILE), metadata={"format": "pt"})
    with open(os.path.join(output_dir, ARGS_FILE), "w") as f:
        json.dump(args, f, indent=2, sort_keys=True, default=str)
