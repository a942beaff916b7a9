"""What a run directory (and every checkpoint-N in it) holds besides the weights: the trainable
non-LoRA weights of a LoRA run, and the resolved arguments, so merge/predict need only one path."""
from __future__ import annotations

import json
import os

from vlft.config import ARGS_FILE
from vlft.models.freezing import is_lora_param

NON_LORA_FILE = "non_lora_trainables.safetensors"


def non_lora_trainables(model, state_dict: dict | None = None) -> dict:
    """Trainable weights that are not LoRA tensors (merger, unfrozen tower...), keyed by the bare model's
    parameter names (PEFT's `base_model.model.` prefix removed).

    Under DeepSpeed the Trainer hands over the gathered `state_dict` (ZeRO-3 partitions leave empty local
    tensors); its values are used then, and a trainable weight missing from it is an error."""
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or is_lora_param(name):
            continue
        if state_dict is not None:
            if name not in state_dict:
                raise RuntimeError(f"trainable weight {name} is missing from the gathered state dict; with ZeRO-3 "
                                   "set stage3_gather_16bit_weights_on_model_save to true")
            tensor = state_dict[name]
        else:
            tensor = param
        out[name.removeprefix("base_model.model.")] = tensor.detach().to("cpu").contiguous()
    return out


def save_extras(model, output_dir: str, args: dict, *, is_peft: bool, state_dict: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    if is_peft:
        tensors = non_lora_trainables(model, state_dict)
        if tensors:
            save_file(tensors, os.path.join(output_dir, NON_LORA_FILE), metadata={"format": "pt"})
    with open(os.path.join(output_dir, ARGS_FILE), "w") as f:
        json.dump(args, f, indent=2, sort_keys=True, default=str)
