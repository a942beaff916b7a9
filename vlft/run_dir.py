"""One owner of what a run directory (and every checkpoint-N inside it) holds besides the weights: its file
names, the writing and the reading. Merge, predict and the training stages go through here, never through
file names of their own.

    output_dir/
      adapter_model.safetensors, adapter_config.json   LoRA runs (written by PEFT through the Trainer)
      model.safetensors, config.json                   full fine-tuning runs (written by the Trainer)
      non_lora_trainables.safetensors                   LoRA runs: the weights trained fully next to the adapter
      vlft_trained.json                                 what trained: the names above, the adapted modules
      vlft_args.json                                    the resolved arguments (reusable as --config)
      initial_adapter/                                  PiSSA / OLoRA runs: the adapter as created (PEFT's format,
                                                        init_lora_weights true), for merge's conversion to plain LoRA
      processor / tokenizer files, chat_template.jinja  written by the Trainer

Why `vlft_trained.json`: merge must check the saved weights against what *did* train, not against a
re-run of the freezing and LoRA selection on today's code (which can drift from the code that trained).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlft.models.freezing import is_lora_param

ARGS_FILE = "vlft_args.json"
NON_LORA_FILE = "non_lora_trainables.safetensors"
TRAINED_FILE = "vlft_trained.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INITIAL_ADAPTER = "initial_adapter"
_PEFT_PREFIX = "base_model.model."


def bare_name(name: str) -> str:
    """A parameter or module name of the bare model (PEFT's wrapper prefix removed)."""
    return name.removeprefix(_PEFT_PREFIX)


def non_lora_trainables(model, state_dict: dict | None = None) -> dict:
    """Trainable weights that are not LoRA tensors (merger, unfrozen tower...), keyed by the bare model's
    parameter names.

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
        out[bare_name(name)] = tensor.detach().to("cpu").contiguous()
    return out


def trained_record(model) -> dict:
    """What trains in `model` now: {"non_lora": sorted bare names of fully trained weights, "lora_modules": sorted
    bare names of what carries a trainable adapter, as models/lora.py `lora_targets` names it (modules, and the
    routed experts' parameters adapted through PEFT's target_parameters, e.g. `...mlp.experts.gate_up_proj`)}."""
    non_lora = [bare_name(n) for n, p in model.named_parameters() if p.requires_grad and not is_lora_param(n)]
    return {"non_lora": sorted(non_lora), "lora_modules": adapted_targets(model, trainable_only=True)}


def adapted_targets(model, *, trainable_only: bool = False) -> list[str]:
    """Sorted bare names of what carries a LoRA adapter in `model`: an adapted module's name, or for PEFT's
    ParamWrapper (target_parameters; nested when one module has several adapted parameters, each inner one behind
    a `base_layer`) the adapted parameter's name. Virtual tokens adapt nothing."""
    owners = {n.split(".lora_", 1)[0] for n, p in model.named_parameters()
              if ".lora_" in n and (p.requires_grad or not trainable_only)}
    names = set()
    for owner in owners:
        parameter = getattr(model.get_submodule(owner), "parameter_name", None)  # set on PEFT's ParamWrapper only
        name = bare_name(owner)
        names.add(f"{name.replace('.base_layer', '')}.{parameter}" if parameter else name)
    return sorted(names)


def write_run_files(model, output_dir: str | os.PathLike, args: dict, *, is_peft: bool,
                    state_dict: dict | None = None) -> None:
    """vlft's files next to the weights the Trainer wrote: the fully trained non-LoRA weights of a LoRA run
    (safetensors), what trained, the resolved arguments, and a PiSSA / OLoRA run's initial adapter."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    initial = getattr(model, "vlft_initial_adapter", None)
    if is_peft and initial is not None:
        write_initial_adapter(model, out / INITIAL_ADAPTER, initial)
    if is_peft:
        tensors = non_lora_trainables(model, state_dict)
        if tensors:
            save_file(tensors, str(out / NON_LORA_FILE), metadata={"format": "pt"})
    (out / TRAINED_FILE).write_text(json.dumps(trained_record(model), indent=1))
    (out / ARGS_FILE).write_text(json.dumps(args, indent=2, sort_keys=True, default=str))


def write_initial_adapter(model, path: Path, tensors: dict) -> None:
    """The adapter of a PiSSA / OLoRA run as it was created (`tensors`: PEFT's adapter state dict, taken before the
    first step), in PEFT's format and with `init_lora_weights` true, which is what PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)` expects of it (PEFT's PiSSA / OLoRA docs)."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_run_args(run_dir: str | os.PathLike) -> dict:
    """The resolved arguments a run saved ({} when the directory has none: a base or merged model)."""
    path = Path(run_dir) / ARGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def base_model_of(run_dir: str | os.PathLike, override: str | None = None) -> str:
    """The base model an adapter run trained from (its recorded --model_id), unless `override` is given."""
    from vlft.errors import VlftError

    base = override or read_run_args(run_dir).get("model_id")
    if not base:
        raise VlftError(f"{Path(run_dir) / ARGS_FILE} is missing, so the base model is unknown: pass --base_model")
    return base


def read_trained(run_dir: str | os.PathLike) -> dict | None:
    """What trained (see `trained_record`), or None for a run saved before vlft recorded it."""
    path = Path(run_dir) / TRAINED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_adapter_run(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_non_lora(run_dir: str | os.PathLike) -> dict:
    """The fully trained weights saved next to an adapter ({} when there are none)."""
    from safetensors.torch import load_file

    path = Path(run_dir) / NON_LORA_FILE
    return load_file(str(path)) if path.is_file() else {}


def read_adapter(run_dir: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / ADAPTER_WEIGHTS))


# A merged model's record of the media settings training used (it has no vlft_args.json); written by merge,
# read by predict (vlft/models/processor_media.py).
MEDIA_FILE = "vlft_media.json"


def read_media_record(model_dir: str | os.PathLike) -> dict:
    """The media settings a merged model carries ({} when it has none: a base model, or merged before vlft
    recorded them)."""
    path = Path(model_dir) / MEDIA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
