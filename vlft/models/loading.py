"""Load the processor and the model the same way for a hub id, a local checkpoint or the tiny model."""
from __future__ import annotations

import torch

from vlft.errors import VlftError
from vlft.models.registry import Family, get_family
from vlft.utils import check_model_source

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _wrap_load_error(what: str, model_id: str, err: Exception) -> VlftError:
    import os

    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep + os.sep in model_id
    if looks_local and not os.path.exists(os.path.expanduser(model_id)):
        return VlftError(f"the model directory {model_id!r} does not exist; check the path (a run directory, a merged "
                         "model, or a Hugging Face model id such as Qwen/Qwen2-VL-2B-Instruct)")
    return VlftError(
        f"could not load the {what} from {model_id!r}: {err}. "
        "Pass a local checkpoint directory (with config.json) or a Hugging Face model id you can reach."
    )


def load_family(model_id: str) -> Family:
    from transformers import AutoConfig

    check_model_source(model_id, "model")  # a hub id with no hub: say so now, not after minutes of retries
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        raise _wrap_load_error("config", model_id, err) from None
    return get_family(config.model_type)


def load_processor(model_id: str):
    from transformers import AutoProcessor

    check_model_source(model_id, "model")
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        raise _wrap_load_error("processor", model_id, err) from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise VlftError(f"{model_id!r} has no image processor + tokenizer; is it a Qwen-VL checkpoint?")
    if processor.tokenizer.pad_token_id is None:
        raise VlftError(f"the tokenizer of {model_id!r} has no pad token; set pad_token in tokenizer_config.json")
    return processor


# Projections a few features wide stay in full precision: Qwen3.5's Gated DeltaNet gates (in_proj_a, in_proj_b: one
# output per value head, 48 in the 27B) and the MoE shared expert's sigmoid gate (one output). 4 bits save nothing
# there, and bitsandbytes' CPU inference path (no-grad eval forwards, e.g. --eval_data_path) repacks 4-bit weights
# in blocks of 32 outputs and raises "N must be divisible by block_n" for them (bitsandbytes 0.50, AVX512-BF16 CPUs).
NOT_QUANTISED = ("linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.shared_expert_gate")


def quantization_config(family: Family, *, bits: int, quant_type: str, double_quant: bool, compute_dtype: str):
    """bitsandbytes settings for QLoRA: only the language model's decoder layers are quantised; the vision
    tower, merger, embeddings and head stay in full precision (they are small and often trained)."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise VlftError(f"--bits {bits} needs bitsandbytes: pip install bitsandbytes (or drop --bits)") from None
    skip = [family.vision_prefix.rstrip("."), family.head_prefix, family.embed_prefix.rstrip("."),
            *NOT_QUANTISED]
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8, llm_int8_skip_modules=skip,
        bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )


def load_model(model_id: str, *, dtype: str = "fp32", attn_implementation: str = "sdpa", bits: int = 16,
               quant_type: str = "nf4", double_quant: bool = True):
    """Returns (model, family). `dtype` is the storage dtype of the weights (bf16 for GPU runs); `bits` 4 or 8
    loads the language model quantised with bitsandbytes (QLoRA)."""
    import os

    from transformers import AutoModelForImageTextToText

    family = load_family(model_id)
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise VlftError(
                "--attn_implementation flash_attention_2 needs the flash-attn package and a CUDA GPU; "
                "install it (pip install flash-attn --no-build-isolation) or use --attn_implementation sdpa"
            )
    extra = {}
    if bits in (4, 8):
        extra["quantization_config"] = quantization_config(family, bits=bits, quant_type=quant_type,
                                                           double_quant=double_quant, compute_dtype=dtype)
        if torch.cuda.is_available():  # bitsandbytes places weights at load time: one device per process
            extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **extra
        )
    except (OSError, ValueError) as err:
        raise _wrap_load_error("model", model_id, err) from None
    if model.config.model_type != family.model_type:  # pragma: no cover - guards against a transformers remap
        raise VlftError(f"loaded {model.config.model_type!r} but the config says {family.model_type!r}")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        from vlft.models.patches import fix_zero3_weight_conversions

        fix_zero3_weight_conversions(model)
    # Training never uses the KV cache; leaving it on only wastes memory and warns under checkpointing. The
    # language model reads its own text_config: with use_cache left on there, every training forward builds a
    # cache, and transformers then ignores packed-sequence position ids when it builds the attention mask.
    set_use_cache(model, False)
    return model, family


def set_use_cache(model, value: bool) -> None:
    model.config.use_cache = value
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config.use_cache = value
