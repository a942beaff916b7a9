"""Load the processor and the model the same way for a hub id, a local checkpoint or the tiny model, and open
anything vlft wrote (`open_trained`: a base model, a run directory or a checkpoint-N in it, LoRA or full or virtual
tokens, a merged model) for predict, merge, a frozen reference and a reward model."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vlft.errors import VlftError
from vlft.models.registry import Family, get_family
from vlft.utils import _looks_local, check_model_source, log

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _missing_local(model_id: str) -> bool:
    """A path (not a hub id) that does not exist."""
    import os

    return _looks_local(model_id) and not os.path.exists(os.path.expanduser(model_id))


def _missing_error(model_id: str) -> VlftError:
    return VlftError(f"the model directory {model_id!r} does not exist; check the path (a run directory, a "
                     "checkpoint-N inside one, a merged model, or a Hugging Face model id such as "
                     "Qwen/Qwen2-VL-2B-Instruct)")


def _wrap_load_error(what: str, model_id: str, err: Exception) -> VlftError:
    if _missing_local(model_id):
        return _missing_error(model_id)
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
               quant_type: str = "nf4", double_quant: bool = True, family: Family | None = None):
    """Returns (model, family). `dtype` is the storage dtype of the weights (bf16 for GPU runs); `bits` 4 or 8
    loads the language model quantised with bitsandbytes (QLoRA); `family`, when the caller has read it already
    (`describe_trained`), saves a second read of the config."""
    import os

    from transformers import AutoModelForImageTextToText

    family = family or load_family(model_id)
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


# --- opening what vlft wrote --------------------------------------------------------------------------------------
# What a path holds is decided once (`describe_trained`), and each kind has one opener (`OPENERS`): predict, merge,
# the frozen reference of full fine-tuning and the reward model all open models through `open_trained`.

BASE = "base"  # a model without vlft's records: a hub id, a downloaded checkpoint
FULL_RUN = "full_run"  # a full fine-tuning run: config.json, the weights and vlft_args.json
LORA_RUN = "lora_run"  # a LoRA / DoRA / QLoRA run: PEFT's adapter, the weights trained next to it, vlft_args.json
VIRTUAL_TOKEN_RUN = "virtual_token_run"  # P-Tuning / prompt tuning: PEFT's prompt embeddings, not mergeable
MERGED = "merged"  # written by vlft merge: a plain checkpoint with the record of training's media settings
KINDS = {BASE: "a base model", FULL_RUN: "a full fine-tuning run", LORA_RUN: "a LoRA run",
         VIRTUAL_TOKEN_RUN: "a virtual-token run", MERGED: "a model merged by vlft merge"}


@dataclass(frozen=True)
class Trained:
    """What a path holds, read from its small files and its (or its base's) config; no weights (`describe_trained`).

    path: as given (a hub id for a base model); kind: a key of KINDS; checkpoint: True for a checkpoint-N folder of a
    run (it opens as the run would); family: the model family (an adapter run's: its base model's); base_model: the
    model an adapter run applies to (its recorded --model_id, or the --base_model given), the --model_id a full run
    started from, None for a base or merged model; processor_source: where the processor loads from (the folder
    itself: every vlft save writes the processor there; an adapter run that holds none: its base); run_args: the
    run's resolved arguments (vlft_args.json; {} for a base or merged model); media: the settings training used,
    keyed by flag name (a run's run_args, a merged model's vlft_media.json, {} for a base model): pixel budgets,
    frame sampling and reasoning flags, for data/processor_media.py `media_settings_from_args` and predict."""

    path: str
    kind: str
    checkpoint: bool
    family: Family
    base_model: str | None
    processor_source: str
    run_args: dict
    media: dict


@dataclass(frozen=True)
class Opened(Trained):
    """`Trained` and the model it describes, loaded (`open_trained`)."""

    model: object


def describe_trained(path, *, base_model: str | None = None) -> Trained:
    """What `path` (a local folder or a hub id) holds, decided from its files, without loading weights:

    - adapter_config.json (PEFT's): a virtual-token run when its peft_type is P_TUNING / PROMPT_TUNING
      (models/virtual_tokens.py), else a LoRA run;
    - config.json with vlft_args.json: a full fine-tuning run; with vlft_media.json: a merged model; alone: a base;
    - not a local folder: a hub id, a base model.
    A checkpoint-N folder (with trainer_state.json) is its run's kind, with `checkpoint` True. File names:
    vlft/run_dir.py.

    `base_model` replaces an adapter run's recorded base (--base_model); for any other kind it would change nothing
    and is refused. Raises VlftError, naming the path and what to do, for a local path that does not exist or is a
    file, a folder with neither model nor adapter (naming the newest checkpoint-N of a run that has one), an adapter
    run that records no base when none is given, and a config of no Qwen-VL family."""
    from vlft.run_dir import CHECKPOINT_PREFIX, STATE_FILE, base_model_of, read_media_record, read_run_args

    name = str(path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        kind = _kind_of_folder(folder)
    elif folder.exists():
        raise VlftError(f"{name} is a file; give the folder that holds the model (a run directory, a checkpoint-N "
                        "inside one, a merged model) or a Hugging Face model id")
    elif _missing_local(name):
        raise _missing_error(name)
    else:
        kind = BASE
    adapter = kind in (LORA_RUN, VIRTUAL_TOKEN_RUN)
    if base_model is not None and not adapter:
        raise VlftError(f"--base_model {base_model}: {name} is {KINDS[kind]}, which holds all its weights; "
                        "--base_model names the base of an adapter run only: leave it out")
    run_args = read_run_args(folder) if folder.is_dir() else {}
    base = base_model_of(folder, base_model) if adapter else run_args.get("model_id")
    family = load_family(base if adapter else name)
    media = run_args or (read_media_record(folder) if folder.is_dir() else {})
    processor_source = base if adapter and not _holds_processor(folder) else name
    checkpoint = folder.name.startswith(CHECKPOINT_PREFIX) and (folder / STATE_FILE).is_file()
    return Trained(name, kind, checkpoint, family, base, processor_source, run_args, media)


def _kind_of_folder(folder: Path) -> str:
    from transformers.utils import CONFIG_NAME

    from vlft.run_dir import ADAPTER_CONFIG, ARGS_FILE, CHECKPOINT_PREFIX, MEDIA_FILE, is_adapter_run

    if is_adapter_run(folder):
        from vlft.models.virtual_tokens import is_virtual_token_run

        return VIRTUAL_TOKEN_RUN if is_virtual_token_run(folder) else LORA_RUN
    if (folder / CONFIG_NAME).is_file():
        return FULL_RUN if (folder / ARGS_FILE).is_file() else MERGED if (folder / MEDIA_FILE).is_file() else BASE
    steps = sorted(int(p.name.removeprefix(CHECKPOINT_PREFIX)) for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
                   if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit())
    hint = (f"a run that has not saved its final model yet: give one of its checkpoints, e.g. "
            f"{folder / f'{CHECKPOINT_PREFIX}{steps[-1]}'}" if steps else
            "give a run directory, a checkpoint-N inside one, a merged model or a base model")
    raise VlftError(f"{folder} holds no model ({CONFIG_NAME}) and no adapter ({ADAPTER_CONFIG}): {hint}")


def _holds_processor(folder: Path) -> bool:
    """Whether a run folder holds its processor (the Trainer saves it with every checkpoint; older vlft did not)."""
    from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE

    return (folder / TOKENIZER_CONFIG_FILE).is_file()


def open_trained(path, *, base_model: str | None = None, dtype: str = "fp32", device=None,
                 attn_implementation: str = "sdpa", merge_adapter: bool = True, use_cache: bool = True) -> Opened:
    """Open anything vlft wrote, or a base model, ready for inference or as a frozen copy: `describe_trained(path,
    base_model=...)` (`path` may be such a `Trained` already: then it is not read again, and `base_model` is not
    given) with the model loaded by its kind's opener:

    - a base model, a full run (or a checkpoint-N of one), a merged model: the checkpoint as `load_model` loads it;
    - a LoRA run (or a checkpoint-N of one): the base model, the weights the run trained fully next to the adapter
      (non_lora_trainables), then the adapter, every key checked against the model and against the run's
      vlft_trained.json (a PiSSA / OLoRA adapter first rewritten as plain LoRA of the original weights,
      `_plain_lora_of`); merged into the weights (PEFT's merge_and_unload) unless `merge_adapter` is False (then a
      PeftModel: PEFT's unmerged forward);
    - a virtual-token run: the base model in models/virtual_tokens.py's VirtualTokenModel (never merged: the virtual
      tokens are inputs, not weights).

    The model is in eval mode, its weights in `dtype` ("fp32", "bf16", "fp16"; a LoRA run is applied in that dtype
    and cast to it after), moved to `device` when one is given (else where transformers loads it: the CPU, or ZeRO-3's
    partitions under DeepSpeed), with the KV cache on when `use_cache` (generation; a copy fed packed rows wants it
    off, see `load_model`). Raises VlftError as `describe_trained` does, and for a run whose saved weights do not
    fit its base (naming the keys) or a virtual-token run whose file holds other tensors."""
    if dtype not in DTYPES:
        raise VlftError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if isinstance(path, Trained):
        if base_model is not None:
            raise ValueError("open_trained: a Trained carries its base model; pass base_model to describe_trained")
        trained = path
    else:
        trained = describe_trained(path, base_model=base_model)
    model = OPENERS[trained.kind](trained, dtype=dtype, attn_implementation=attn_implementation,
                                  merge_adapter=merge_adapter)
    set_use_cache(model.get_base_model() if hasattr(model, "get_base_model") else model, use_cache)
    if device is not None:
        model.to(device)
    return Opened(**{f.name: getattr(trained, f.name) for f in fields(Trained)}, model=model.eval())


def _open_checkpoint(trained: Trained, *, dtype: str, attn_implementation: str, merge_adapter: bool):
    return load_model(trained.path, dtype=dtype, attn_implementation=attn_implementation, family=trained.family)[0]


def _open_virtual_tokens(trained: Trained, *, dtype: str, attn_implementation: str, merge_adapter: bool):
    from vlft.models.virtual_tokens import load_virtual_tokens

    base, _ = load_model(trained.base_model, dtype=dtype, attn_implementation=attn_implementation,
                         family=trained.family)
    return load_virtual_tokens(base, trained.path)


def _open_lora_run(trained: Trained, *, dtype: str, attn_implementation: str, merge_adapter: bool):
    from peft import LoraConfig, set_peft_model_state_dict

    from vlft.models.lora import mutates_base, wrap_peft
    from vlft.run_dir import ADAPTER_WEIGHTS, NON_LORA_FILE, TRAINED_FILE, read_adapter, read_non_lora, read_trained

    run_dir, base = Path(trained.path), trained.base_model
    if not (run_dir / ADAPTER_WEIGHTS).is_file():
        raise VlftError(f"{run_dir} has an adapter config but no {ADAPTER_WEIGHTS}: the save is incomplete; give "
                        "another checkpoint of the run")
    model, _ = load_model(base, dtype=dtype, attn_implementation=attn_implementation, family=trained.family)
    record = read_trained(run_dir)
    if record is None:
        log(f"{run_dir} has no {TRAINED_FILE} (saved by an older vlft): its {NON_LORA_FILE} is applied as it is")
    saved = read_non_lora(run_dir)
    params = dict(model.named_parameters())
    expected = set(record["non_lora"]) if record is not None else set(saved)
    problems = []
    for what, names in ((f"trained weights missing from {NON_LORA_FILE}", expected - set(saved)),
                        (f"{NON_LORA_FILE} holds weights this model does not have", set(saved) - set(params)),
                        (f"{NON_LORA_FILE} holds weights that {TRAINED_FILE} says did not train",
                         set(saved) & set(params) - expected)):
        if names:
            names = sorted(names)
            problems.append(f"{what}: {', '.join(names[:8])}"
                            + (f" (and {len(names) - 8} more)" if len(names) > 8 else ""))
    if problems:
        raise VlftError(f"cannot apply {run_dir} to {base}:\n  - " + "\n  - ".join(problems)
                        + "\nIs --base_model the model this run was trained from?")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))

    config = LoraConfig.from_pretrained(str(run_dir))
    config.inference_mode = True
    adapter = read_adapter(run_dir)
    if mutates_base(config.init_lora_weights):
        config, adapter = _plain_lora_of(model, run_dir, config, adapter)
    peft_model = wrap_peft(model, config)
    result = set_peft_model_state_dict(peft_model, adapter)
    if result.unexpected_keys:
        raise VlftError(f"{run_dir / ADAPTER_WEIGHTS} holds keys the model has no place for: "
                        f"{', '.join(sorted(result.unexpected_keys)[:8])}; is {base} the model this run trained from?")
    missing = sorted(k for k in result.missing_keys if ".lora_" in k)
    if missing:
        raise VlftError(f"{run_dir / ADAPTER_WEIGHTS} lacks adapter weights: {', '.join(missing[:8])}")
    _check_adapted_targets(run_dir, peft_model, record)
    if dtype != "fp32":  # PEFT keeps adapters of a half-precision base in fp32
        peft_model.to(DTYPES[dtype])
    return peft_model.merge_and_unload() if merge_adapter else peft_model


OPENERS = {BASE: _open_checkpoint, FULL_RUN: _open_checkpoint, MERGED: _open_checkpoint, LORA_RUN: _open_lora_run,
           VIRTUAL_TOKEN_RUN: _open_virtual_tokens}  # kind -> (trained, *, dtype, attn_implementation, merge_adapter)


def _check_adapted_targets(run_dir: Path, peft_model, record: dict | None) -> None:
    """What the adapter config adapts (modules, and routed-expert parameters through target_parameters) must be what
    the run recorded as adapted in vlft_trained.json (`record`); a run saved before that record is taken as it is."""
    from vlft.run_dir import ADAPTER_CONFIG, TRAINED_FILE, adapted_targets

    if record is None:
        return
    recorded, built = set(record["lora_modules"]), set(adapted_targets(peft_model))
    if recorded != built:
        raise VlftError(f"{run_dir}: its {ADAPTER_CONFIG} adapts other targets than {TRAINED_FILE} records (only in "
                        f"the record: {sorted(recorded - built)[:4]}; only in the config: "
                        f"{sorted(built - recorded)[:4]}); the run directory was changed after training")


def _plain_lora_of(model, run_dir: Path, config, adapter: dict):
    """A PiSSA / OLoRA run's adapter as a plain LoRA adapter of the *original* weights: (config, tensors).

    Training ran on residual weights W_res = W - s B0 A0 with the adapter started at (A0, B0), so the trained model is
    W_res + s B A = W + s (B A - B0 A0): a LoRA update of rank 2r, A' = [A; A0], B' = [B, -B0] (PEFT's
    `subtract_mutated_init`). PEFT computes it in `save_pretrained(path_initial_model_for_weight_conversion=...)`
    from the initial adapter the run saved (INITIAL_ADAPTER); this does that in a scratch directory (PEFT writes a
    config into the initial adapter's folder, and the run is never written to), on `model` wrapped with plain LoRA
    (the conversion reads only adapter tensors), then takes the wrapping off again. `model` is left as it came."""
    import copy

    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from vlft.models.lora import wrap_peft
    from vlft.run_dir import ADAPTER_WEIGHTS, INITIAL_ADAPTER

    initial = run_dir / INITIAL_ADAPTER
    if not (initial / ADAPTER_WEIGHTS).is_file():
        raise VlftError(f"cannot apply {run_dir}: it trained with --init_lora_weights {config.init_lora_weights}, "
                        f"which changes the base weights, and its {INITIAL_ADAPTER}/ (the adapter as created, needed "
                        "to undo that change) is missing; its adapter only fits the residual weights of that run")
    scratch_config = copy.deepcopy(config)
    scratch_config.init_lora_weights = True  # the original weights stay untouched
    with tempfile.TemporaryDirectory(prefix="vlft-convert-") as tmp:
        shutil.copytree(initial, Path(tmp) / INITIAL_ADAPTER)
        scratch = wrap_peft(model, scratch_config)
        result = set_peft_model_state_dict(scratch, adapter)
        if result.unexpected_keys:
            raise VlftError(f"{run_dir / ADAPTER_WEIGHTS} holds keys the model has no place for: "
                            f"{', '.join(sorted(result.unexpected_keys)[:8])}")
        scratch.save_pretrained(str(Path(tmp) / "converted"),
                                path_initial_model_for_weight_conversion=str(Path(tmp) / INITIAL_ADAPTER))
        scratch.unload()
        converted = Path(tmp) / "converted"
        plain = LoraConfig.from_pretrained(str(converted))
        tensors = load_file(str(converted / ADAPTER_WEIGHTS))
    plain.inference_mode = True
    log(f"{run_dir}: {config.init_lora_weights} adapter converted to plain LoRA of rank {plain.r} on the original "
        "weights")
    return plain, tensors
