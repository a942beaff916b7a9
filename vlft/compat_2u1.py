"""2U1/Qwen2-VL-Finetune spellings, translated in one place, so its launch scripts run unchanged.

The old flags stay declared on the argument dataclasses (so `--help` lists them and a saved run records them);
`translate` maps each onto vlft's own flag once, right after parsing (config.parse_command calls it), and refuses
a pair that contradicts itself. Nothing else in vlft reads the old names.

    --disable_flash_attn2 B        -> --attn_implementation sdpa (B true) / flash_attention_2 (B false)
    --min_pixels / --max_pixels    -> --image_min_pixels / --image_max_pixels
    --tune_merger B                -> --freeze_merger (not B)
    --lora_namespan_exclude "['a', 'b']"  (one Python-literal string) -> --lora_namespan_exclude a b
    --dpo_loss NAME                -> --loss_type NAME (2U1 declared it but never read it; vlft does)
    --lazy_preprocess true         -> accepted and ignored: vlft always loads media lazily, in the loader workers
"""
from __future__ import annotations

import ast
import dataclasses


def translate(groups) -> None:
    """Apply the translations above to the parsed argument groups, in place. ValueError names the flags of a
    contradiction."""
    for group in groups:
        name = type(group).__name__
        if name == "ModelArguments":
            _attention(group)
        elif name == "DataArguments":
            _pixels(group)
        elif name == "TuneArguments":
            _merger(group)
            _namespan(group)
        elif name == "DPOConfig":
            _dpo_loss(group)


def _attention(model_args) -> None:
    if model_args.disable_flash_attn2 is not None:
        wanted = "sdpa" if model_args.disable_flash_attn2 else "flash_attention_2"
        if model_args.attn_implementation not in ("sdpa", wanted):
            raise ValueError(f"--disable_flash_attn2 {model_args.disable_flash_attn2} contradicts "
                             f"--attn_implementation {model_args.attn_implementation}")
        model_args.attn_implementation = wanted


def _pixels(data_args) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(data_args)}
    for old, new in (("min_pixels", "image_min_pixels"), ("max_pixels", "image_max_pixels")):
        value = getattr(data_args, old)
        if value is not None:
            if getattr(data_args, new) not in (value, defaults[new]):
                raise ValueError(f"--{old} {value} contradicts --{new} {getattr(data_args, new)}; give only --{new}")
            setattr(data_args, new, value)
    if not data_args.lazy_preprocess:
        raise ValueError("--lazy_preprocess false is not supported: vlft loads images in the data loader workers")


def _merger(tune_args) -> None:
    if tune_args.tune_merger is not None:
        if tune_args.freeze_merger and tune_args.tune_merger:
            raise ValueError("--tune_merger true contradicts --freeze_merger true")
        tune_args.freeze_merger = not tune_args.tune_merger


def _namespan(tune_args) -> None:
    names = tune_args.lora_namespan_exclude
    if len(names) == 1 and names[0].lstrip().startswith("["):
        try:
            value = ast.literal_eval(names[0])
        except (ValueError, SyntaxError):
            raise ValueError(f"--lora_namespan_exclude: cannot read {names[0]!r}; give the names as separate words: "
                             "--lora_namespan_exclude lm_head embed_tokens") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("--lora_namespan_exclude must be a list of names")
        tune_args.lora_namespan_exclude = value


def _dpo_loss(dpo_args) -> None:
    if dpo_args.dpo_loss is not None:
        if dpo_args.loss_type not in (["sigmoid"], [dpo_args.dpo_loss]):
            raise ValueError(f"--dpo_loss {dpo_args.dpo_loss} contradicts --loss_type {','.join(dpo_args.loss_type)}; "
                             "give only --loss_type")
        dpo_args.loss_type = [t.strip() for t in dpo_args.dpo_loss.split(",") if t.strip()]
