"""Argument dataclasses grouped by concern, `--config run.yaml`, and the cross-field checks.

Every field is a command-line flag of the same name; a YAML (or JSON) config uses the same names as
keys, and flags given on the command line win over the file. Flag names follow 2U1/Qwen2-VL-Finetune.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from vlft import compat_2u1
from vlft.errors import VlftError


@dataclass
class ModelArguments:
    model_id: str | None = field(
        default=None, metadata={"help": "Hugging Face model id or local checkpoint dir (Qwen2-VL / 2.5-VL / 3-VL)."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel.", "choices": ["sdpa", "eager", "flash_attention_2"]}
    )
    disable_flash_attn2: bool | None = field(
        default=None, metadata={"help": "2U1 spelling: false = --attn_implementation flash_attention_2, true = sdpa."}
    )


@dataclass
class DataArguments:
    data_path: list[str] | None = field(
        default=None,
        metadata={"help": "One or more data files (JSON list, JSONL, parquet, arrow, save_to_disk folder), each "
                          "optionally with #N (N records, drawn with --seed; above the file's size the file repeats) "
                          "or #p (0 < p < 1: that share of its records): a.json b.jsonl#1000 c.parquet#0.5, or one "
                          "string separated by commas or spaces. Each file is checked on its own; the mix is logged "
                          "(data/mixture.py). --eval_data_path takes one file; predict and preview one file whole."},
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Held-out records in --data_path's format, checked at start-up like it (same --image_folder "
                          "and media settings); their loss is logged as eval_loss every --eval_steps (default: "
                          "--logging_steps). vlft sft and vlft rm (reward accuracy too)."},
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder that relative image and video paths resolve against (default: the data file's folder)."},
    )
    # Pixel budgets: None = the model family's default, the same token count for every family (vlft.constants:
    # 4..16384 tokens per image; 3136..12845056 pixels for Qwen2/2.5-VL, 4096..16777216 for Qwen3-VL).
    image_min_pixels: int | None = field(
        default=None, metadata={"help": "Lower pixel budget per image (default: 4 tokens of the model's patch x merge)."}
    )
    image_max_pixels: int | None = field(
        default=None, metadata={"help": "Upper pixel budget per image (default: 16384 tokens of the model's patch x merge)."}
    )
    max_seq_length: int = field(
        default=8192, metadata={"help": "Longest tokenised record, vision tokens included; longer ones are dropped."}
    )
    max_length: int | None = field(default=None, metadata={"help": "TRL's name for --max_seq_length."})
    reject_overlong: bool = field(
        default=False, metadata={"help": "Stop with an error listing over-long records instead of dropping them."}
    )
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Train without invalid records (counted and listed) instead of stopping."}
    )
    max_bad_fraction: float = field(
        default=0.5,
        metadata={"help": "The largest fraction of the records --skip_bad_samples may leave out (0 to 1); a run that "
                          "would leave out more stops with the list, so a wrong --image_folder or file does not train "
                          "on the few records left. 1 turns the limit off. Over-long records dropped by "
                          "--max_seq_length are not counted."},
    )
    check_workers: int = field(default=4, metadata={"help": "Threads that decode images during the start-up data check."})
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes that prepare the data (parse, decode-check, tokenise) the first time; default: "
                          "the CPUs this process may use, up to 32. One process per job does it; the others wait."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "LLaMA-Factory's name for --dataset_num_proc."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where prepared data indexes are kept and found again (default: $VLFT_DATA_CACHE, else "
                          "$VLFT_CACHE/prepared, else ~/.cache/vlft/prepared); on a file system every node sees, a "
                          "multi-node job prepares once."},
    )
    no_data_cache: bool = field(
        default=False,
        metadata={"help": "Prepare the data afresh in every process and keep nothing (no cache read or written)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack records into rows of up to --max_seq_length tokens (per-record mRoPE, no cross-record "
                          "attention); --per_device_train_batch_size then counts packed rows."},
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch records of similar length together (padded batches; not with --packing)."}
    )
    video_min_pixels: int | None = field(
        default=None, metadata={"help": "Lower pixel budget per frame (default: 128 tokens of the model's patch x merge)."}
    )
    video_max_pixels: int | None = field(
        default=None, metadata={"help": "Upper pixel budget per frame (default: 768 tokens of the model's patch x merge)."}
    )
    video_max_total_pixels: int | None = field(
        default=None,
        metadata={"help": "Pixel budget of all sampled frames of one video together, caps a long video's tokens "
                          "(default: 8192 tokens of the model's patch x merge)."},
    )
    fps: float | None = field(
        default=None, metadata={"help": "Frames per second to sample from videos (default 2; not with --nframes)."}
    )
    nframes: int | None = field(default=None, metadata={"help": "Exact frames to sample per video (not with --fps)."})
    video_min_frames: int = field(default=4, metadata={"help": "Fewest frames an --fps sampling may give."})
    video_max_frames: int = field(default=768, metadata={"help": "Most frames an --fps sampling may give."})
    frames_fps: float = field(
        default=2.0, metadata={"help": "Frame rate assumed for a video given as a folder or list of frame images."}
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Older 2U1 spelling of --image_min_pixels."})
    max_pixels: int | None = field(default=None, metadata={"help": "Older 2U1 spelling of --image_max_pixels."})
    enable_thinking: bool | None = field(
        default=None, metadata={"help": "Thinking models: passed to the chat template in every render; true: "
                                "generation prompts (GRPO, predict, DPO) open a <think> block, false: they close an empty "
                                "one (no reasoning). Default: the template's own (Qwen3.5's think template: true)."})
    preserve_thinking: bool | None = field(
        default=None, metadata={"help": "Thinking models: keep (and train) the reasoning of turns before the last user "
                                "message, for templates with this switch (Qwen3.6's). Default: the template's own."})
    train_empty_think: bool = field(
        default=False, metadata={"help": "Learn the empty <think></think> block the template puts before an answer "
                                 "without reasoning (default: it is context, not learned, as in ms-swift)."})
    lazy_preprocess: bool = field(
        default=True, metadata={"help": "Accepted for 2U1 scripts: vlft always loads media lazily (false is an error)."}
    )

    def __post_init__(self):
        from vlft.data.video_sampling import check_sampling  # the one check of the sampling flags

        check_sampling(fps=self.fps, nframes=self.nframes, min_frames=self.video_min_frames,
                       max_frames=self.video_max_frames, frames_fps=self.frames_fps)
        if self.max_length is not None:
            default = DataArguments.__dataclass_fields__["max_seq_length"].default
            if self.max_seq_length not in (default, self.max_length):
                raise ValueError(f"--max_length {self.max_length} contradicts --max_seq_length {self.max_seq_length}; "
                                 "give one of them")
            self.max_seq_length = self.max_length
        if self.preprocessing_num_workers is not None:
            if self.dataset_num_proc not in (None, self.preprocessing_num_workers):
                raise ValueError(f"--preprocessing_num_workers {self.preprocessing_num_workers} contradicts "
                                 f"--dataset_num_proc {self.dataset_num_proc}; give one of them")
            self.dataset_num_proc = self.preprocessing_num_workers
        if self.no_data_cache and self.data_cache_dir:
            raise ValueError(f"--data_cache_dir {self.data_cache_dir} and --no_data_cache true contradict each other: "
                             "keep the cache folder, or turn the cache off")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"--dataset_num_proc {self.dataset_num_proc} must be at least 1")

    def preparation(self) -> dict:
        """The keyword arguments of data/prepare.py `prepare_data` that say how to prepare (not what): processes,
        decoding threads and the cache folder (None under --no_data_cache)."""
        from vlft.data.index import default_cache_dir, default_num_proc

        num_proc = self.dataset_num_proc or default_num_proc()
        if self.no_data_cache and self.dataset_num_proc is None:  # every rank of the node prepares: share the CPUs
            num_proc = max(1, num_proc // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return {"num_proc": num_proc, "workers": self.check_workers,
                "cache_dir": None if self.no_data_cache else (self.data_cache_dir or default_cache_dir())}

    def _pixel_budget_problems(self, defaulted: frozenset[str] = frozenset()) -> list[str]:
        """What is wrong with the pixel budgets set so far (unset ones are skipped); `defaulted` names the fields
        that hold the family's default rather than a flag's value, to say so in the message."""
        def show(name):
            return f"--{name} ({getattr(self, name)}{', the default' if name in defaulted else ''})"

        problems = [f"{show(name)} must be > 0" for name in _PIXEL_BUDGETS
                    if getattr(self, name) is not None and getattr(self, name) <= 0]
        for low, high in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if None not in (getattr(self, low), getattr(self, high)) and getattr(self, low) > getattr(self, high):
                problems.append(f"{show(low)} must be <= {show(high)}")
        return problems

    def resolve_media_defaults(self, family) -> DataArguments:
        """Fill every pixel budget left unset (None) with `family`'s default (`Family.default_pixel_budgets`: token
        counts times its pixel_factor**2), in place, and check them; returns self. Call it before the arguments are
        recorded (`resolved_args`), so that the record holds the numbers training used. Idempotent."""
        defaults = family.default_pixel_budgets()
        defaulted = frozenset(name for name in _PIXEL_BUDGETS if getattr(self, name) is None)
        for name in defaulted:
            setattr(self, name, defaults[name])
        problems = self._pixel_budget_problems(defaulted)
        if problems:
            raise VlftError(f"invalid pixel budgets for {family.model_type} (one token = {family.pixel_factor}x"
                            f"{family.pixel_factor} pixels): " + "; ".join(problems))
        return self

    def media_settings(self, family):
        """The media settings for a model of `family`: resolves the unset pixel budgets first (in place, see
        `resolve_media_defaults`)."""
        from vlft.data.prepare import MediaSettings

        self.resolve_media_defaults(family)
        return MediaSettings(
            image_min_pixels=self.image_min_pixels, image_max_pixels=self.image_max_pixels,
            video_min_pixels=self.video_min_pixels, video_max_pixels=self.video_max_pixels,
            video_max_total_pixels=self.video_max_total_pixels, fps=self.fps, nframes=self.nframes,
            video_min_frames=self.video_min_frames, video_max_frames=self.video_max_frames, frames_fps=self.frames_fps,
        )


_PIXEL_BUDGETS = ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels",
                  "video_max_total_pixels")


@dataclass
class TuneArguments:
    """Which parts learn and how. Freeze flags left unset follow the LoRA choice: LoRA on a part
    implies its base weights are frozen; without LoRA every part trains."""

    freeze_vision_tower: bool | None = field(
        default=None, metadata={"help": "Freeze the vision blocks and patch embedding (default: only under --vision_lora)."}
    )
    freeze_merger: bool = field(default=False, metadata={"help": "Freeze the vision-to-language merger(s)."})
    freeze_llm: bool | None = field(
        default=None, metadata={"help": "Freeze the language model, embeddings and head (default: only under LoRA)."}
    )
    unfreeze_topk_llm: int = field(
        default=0, metadata={"help": "Train the last N decoder layers fully while the rest of the LLM is frozen."}
    )
    unfreeze_topk_vision: int = field(
        default=0, metadata={"help": "Train the last N vision blocks fully while the rest of the tower is frozen."}
    )
    lora_enable: bool = field(default=False, metadata={"help": "LoRA on the language model's linear layers."})
    vision_lora: bool = field(default=False, metadata={"help": "LoRA on the vision blocks' linear layers."})
    lora_namespan_exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "Module name pieces to keep LoRA off, e.g. self_attn.o_proj layers.0 (whole dotted parts)."},
    )
    num_lora_modules: int = field(
        default=-1, metadata={"help": "Put LLM LoRA on only the last N matching modules (-1: all)."}
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_bias: str = field(
        default="none", metadata={"help": "Which biases train with LoRA.", "choices": ["none", "all", "lora_only"]}
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA) instead of plain LoRA."})
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r."}
    )
    init_lora_weights: str = field(
        default="true",
        metadata={"help": "PEFT's LoRA initialisation: true (B = 0), false, gaussian, orthogonal, pissa, pissa_niter_N, "
                          "olora. PiSSA / OLoRA move the principal part of each adapted weight into the adapter."},
    )
    loraplus_lr_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+: the B matrices learn at this multiple of their part's learning rate."}
    )
    peft_type: str = field(
        default="lora",
        metadata={"help": "lora (the LoRA flags above), or a virtual-token method: p_tuning (P-Tuning's prompt encoder) or "
                          "prompt_tuning (trained prompt embeddings); these train only --num_virtual_tokens embeddings "
                          "placed before every sequence.", "choices": ["lora", "p_tuning", "prompt_tuning"]},
    )
    num_virtual_tokens: int | None = field(
        default=None, metadata={"help": "Virtual tokens of --peft_type p_tuning / prompt_tuning (required there)."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "P-Tuning: hidden size of the prompt encoder (default: the model's hidden size)."}
    )
    encoder_reparameterization_type: str | None = field(
        default=None, metadata={"help": "P-Tuning: the prompt encoder, MLP (default) or LSTM.", "choices": ["MLP", "LSTM"]}
    )
    vision_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower (its LoRA included); default: --learning_rate."}
    )
    merger_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the merger(s); default: --learning_rate."}
    )
    bits: int = field(
        default=16, metadata={"help": "Load the LLM quantised for QLoRA (4 or 8; 16 = no quantisation).", "choices": [4, 8, 16]}
    )
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    double_quant: bool = field(default=True, metadata={"help": "Quantise the 4-bit quantisation constants too."})
    use_liger: bool = field(
        default=False, metadata={"help": "Liger kernels (RMSNorm, SwiGLU, fused linear cross-entropy); GPU only."}
    )
    tune_merger: bool | None = field(default=None, metadata={"help": "2U1 spelling: tune_merger x = --freeze_merger (not x)."})
    # mixture-of-experts families (Qwen3-VL-MoE, Qwen3.5-MoE): models/lora.py, models/freezing.py, train/core/setup.py
    lora_target_experts: bool = field(
        default=True,
        metadata={"help": "MoE models: --lora_enable also adapts the routed experts' fused weights (one LoRA per "
                          "expert, through PEFT's target_parameters); false keeps LoRA off them."},
    )
    train_router: bool = field(
        default=False,
        metadata={"help": "MoE models: train the router (and Qwen3.5-MoE's shared-expert gate) fully while the "
                          "language model is frozen (LoRA, --freeze_llm); by default they stay frozen there."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE models, SFT: add the load-balancing loss times this weight to the loss (sets the "
                          "model's output_router_logits and router_aux_loss_coef) and log it as aux_loss; 0 logs it "
                          "without training on it. Unset: off, whatever the checkpoint's config says (as in the released ones)."},
    )

    @property
    def any_lora(self) -> bool:
        return self.lora_enable or self.vision_lora

    @property
    def virtual_tokens(self) -> bool:
        """A virtual-token method (P-Tuning, prompt tuning): only the virtual tokens train, every part is frozen."""
        return self.peft_type != "lora"

    @property
    def llm_frozen(self) -> bool:
        return self.freeze_llm if self.freeze_llm is not None else (self.any_lora or self.virtual_tokens)

    @property
    def vision_frozen(self) -> bool:
        return self.freeze_vision_tower if self.freeze_vision_tower is not None else (self.vision_lora or self.virtual_tokens)

    @property
    def merger_frozen(self) -> bool:
        return self.freeze_merger or self.virtual_tokens


def _config_to_argv(path: str, parser) -> list[str]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VlftError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise VlftError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise VlftError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(data) - set(actions))
    if unknown:
        from vlft.utils import closest_flag

        named = [f"{key} (did you mean {near}?)" if (near := closest_flag(str(key), actions)) else str(key)
                 for key in unknown]
        raise VlftError(f"--config {path}: unknown key(s) {', '.join(named)}; keys are the command-line flag names")
    argv: list[str] = []
    for key, value in data.items():
        if value is None or value == []:
            continue  # the default stands
        if isinstance(value, (list, tuple)):
            if actions[key].nargs in ("+", "*"):
                argv += [f"--{key}", *map(str, value)]
            elif len(value) == 1:
                argv += [f"--{key}", str(value[0])]
            else:  # e.g. report_to: TrainingArguments takes several integrations as one comma-separated value
                argv += [f"--{key}", ",".join(map(str, value))]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _raise_parse_error(message: str):
    raise VlftError(f"{message} (run with --help for the list of flags)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, unless the help already says what the default is (vlft's
    help texts name computed defaults, "default: --learning_rate"; a second "(default: None)" would contradict)."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        return help_ if "default" in help_.lower() else super()._get_help_string(action)


def parse_command(groups: tuple[type, ...], argv: list[str], prog: str = "vlft") -> tuple[list, set[str]]:
    """Read the command line once: `--config FILE` (YAML or JSON, flag names as keys) expanded in place, flags on
    the command line winning over the file; then the flags parsed into the given dataclasses. Returns the parsed
    groups and the names of the flags the user gave (on the command line or in the file), so that a command can
    tell a user's choice from a default.

    When a group is a TrainingArguments subclass and the run is distributed with DeepSpeed, DeepSpeed's process
    group is started before that group is built (train/core/launch.py: `init_distributed_early` says why)."""
    argv = list(argv)
    # full flag names only: argparse's prefix matching took LLaMA-Factory's lora_target for --lora_target_experts
    parser = HfArgumentParser(groups, prog=prog, formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.error = _raise_parse_error  # a one-line VlftError instead of argparse's usage dump
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise VlftError("--config needs a file path")
        config_argv = _config_to_argv(argv[i + 1], parser)
        argv = config_argv + argv[:i] + argv[i + 2:]  # command-line flags come last, so they win
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    for group in groups:  # a stage's config starts what must exist before it is built (DeepSpeed's process group)
        if hasattr(group, "before_parse"):
            group.before_parse(given)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        compat_2u1.translate(parsed)
    except ValueError as err:  # raised by dataclass __post_init__ checks (TrainingArguments among them)
        raise VlftError(f"invalid arguments: {err}") from None
    if remaining:
        flags = [a.split("=", 1)[0] for a in remaining if a.startswith("-")]
        if not flags:
            raise VlftError(f"unexpected value(s) {' '.join(remaining)}: every value follows the flag it sets; run with "
                            "--help for the list of flags")
        from vlft.cli import unknown_flag_error

        known = {o.lstrip("-").replace("-", "_") for a in parser._actions for o in a.option_strings}
        raise VlftError(unknown_flag_error(flags, known))
    return parsed, given


def parse_args(groups: tuple[type, ...], argv: list[str], prog: str = "vlft") -> list:
    """`parse_command` without the given-flag names."""
    return parse_command(groups, argv, prog)[0]


def family_for(model_args):
    """The family descriptor of --model_id (read from its config.json), for `validate(..., family=...)`; None when
    no --model_id is given or its config cannot be read yet: the flag rules come first, and loading the model then
    names what is wrong with it (a missing directory, an unsupported model_type)."""
    if not getattr(model_args, "model_id", None):
        return None
    from vlft.models.loading import load_family

    try:
        return load_family(model_args.model_id)
    except VlftError:
        return None


# feature of a family's capabilities (Family.unsupported) -> (argument group, test that the run asks for it, flag)
_FAMILY_FEATURES = (
    ("packing", "DataArguments", lambda g: getattr(g, "packing", False), "--packing"),
    ("liger", "TuneArguments", lambda g: getattr(g, "use_liger", False), "--use_liger"),
)


def family_problems(family, *groups) -> list[str]:
    """What the run asks for that `family` cannot do, each with the family's reason (Family.unsupported)."""
    problems = []
    for feature, group_name, asks, flag in _FAMILY_FEATURES:
        reason = family.refusal(feature)
        if reason and any(type(g).__name__ == group_name and asks(g) for g in groups):
            problems.append(f"{flag} is not available for {family.display_name} ({family.model_type}): {reason}")
    return problems


def moe_problems(family, tune: TuneArguments) -> list[str]:
    """The mixture-of-experts flags against `family`: refused on a dense family (no router, no routed experts),
    and what PEFT cannot put on the routed experts' fused parameters (models/lora.py: expert_lora_refusal)."""
    asked = [flag for flag, value in (("--train_router", tune.train_router),
                                      ("--router_aux_loss_coef", tune.router_aux_loss_coef is not None),
                                      ("--lora_target_experts false", not tune.lora_target_experts)) if value]
    if family.moe is None:
        return [f"{flag} is not available for {family.display_name} ({family.model_type}): its MLPs are dense, with "
                "no router and no routed experts" for flag in asked]
    if tune.train_router and tune.bits != 16 and family.moe.shared_expert_gate:
        return [f"--train_router with --bits {tune.bits}: {family.display_name}'s shared-expert gate is an nn.Linear "
                "of the decoder layers, quantised with them, and quantised weights cannot train fully; drop one"]
    if tune.lora_enable and tune.lora_target_experts and not tune.virtual_tokens:
        from vlft.models.lora import expert_lora_refusal, lora_init_value

        try:
            init = lora_init_value(tune.init_lora_weights)
        except ValueError:
            return []  # reported by _lora_init_errors
        refused = expert_lora_refusal(use_dora=tune.use_dora, init_lora_weights=init)
        return [refused] if refused else []
    return []


def validate(*groups, family=None) -> None:
    """Every cross-field rule, for whichever argument groups a command uses (each command calls this once);
    one VlftError lists every broken rule, naming the flags involved. With `family` (a descriptor: `family_for`),
    a feature the family cannot do is refused with its reason too."""
    errors: list[str] = []
    tune = next((g for g in groups if isinstance(g, TuneArguments)), None)
    for group in groups:
        if isinstance(group, TrainingArguments) and group.use_liger_kernel:
            # The Trainer's own Liger path calls liger-kernel's class patches, which fail on the transformers
            # versions vlft supports (models/patches: liger); vlft's --use_liger applies the same kernels.
            if tune is None:
                errors.append("--use_liger_kernel is not used by this command")
            else:
                tune.use_liger, group.use_liger_kernel = True, False

        if isinstance(group, ModelArguments) and not group.model_id:
            errors.append("--model_id is required (a Hugging Face id or a local Qwen-VL checkpoint dir)")
        elif isinstance(group, DataArguments):
            errors += _data_errors(group)
        elif isinstance(group, TuneArguments):
            errors += _tune_errors(group)
            data = next((g for g in groups if isinstance(g, DataArguments)), None)
            if group.virtual_tokens and data is not None and getattr(data, "packing", False):
                errors.append(f"--packing with --peft_type {group.peft_type}: the virtual tokens go before each row, "
                              "not before each packed record, so records after the first would not see them; "
                              "train without --packing")
            train = next((g for g in groups if isinstance(g, TrainingArguments)), None)
            if group.router_aux_loss_coef is not None and train is not None and not train.router_aux_loss_joins:
                errors.append(f"--router_aux_loss_coef is applied to the SFT loss only: {train.stage_name}'s loss is "
                              "computed from log-probs, which the load-balancing term does not join; drop it")
            if group.peft_type == "p_tuning" and train is not None and train.resume_from_checkpoint:
                errors.append("--resume_from_checkpoint with --peft_type p_tuning: PEFT saves the prompt encoder's "
                              "output, not the encoder, so training cannot continue from a checkpoint; start again")
        elif isinstance(group, TrainingArguments):
            if not group.output_dir:
                errors.append("--output_dir is required")
            errors += group.problems() if hasattr(group, "problems") else []
            if family is not None and hasattr(group, "family_problems"):
                errors += group.family_problems(family)  # the stage's own refusals for this family
    if family is not None:
        errors += family_problems(family, *groups)
        errors += moe_problems(family, tune) if tune is not None else []
    if errors:
        raise VlftError("invalid arguments:\n  - " + "\n  - ".join(errors))


def _data_errors(data_args: DataArguments) -> list[str]:
    errors = []
    if not data_args.data_path:
        errors.append("--data_path is required (a LLaVA-format JSON or JSONL file)")
    if data_args.image_folder and not os.path.isdir(data_args.image_folder):
        errors.append(f"--image_folder {data_args.image_folder}: no such directory")
    errors += data_args._pixel_budget_problems()  # the unset ones are checked once the family resolves them
    if data_args.packing and data_args.group_by_length:
        errors.append("--packing and --group_by_length both arrange records into batches; give only one")
    if data_args.max_seq_length < 8:  # named by the flag the user gave: TRL's --max_length sets it too
        flag = "--max_length" if data_args.max_length is not None else "--max_seq_length"
        errors.append(f"{flag} {data_args.max_seq_length} is too small")
    return errors


def _tune_errors(tune_args: TuneArguments) -> list[str]:
    errors = []
    t = tune_args
    if t.lora_enable and t.freeze_llm is False:
        errors.append("--lora_enable trains adapters on a frozen language model, but --freeze_llm false asks to train it "
                      "fully; drop one of the two")
    if t.vision_lora and t.freeze_vision_tower is False:
        errors.append("--vision_lora trains adapters on a frozen vision tower, but --freeze_vision_tower false asks to "
                      "train it fully; drop one of the two")
    if t.any_lora and t.lora_rank < 1:
        errors.append("--lora_rank must be >= 1")
    if not t.any_lora:
        for flag, value, default in (("--use_dora", t.use_dora, False), ("--lora_namespan_exclude", t.lora_namespan_exclude, []),
                                     ("--num_lora_modules", t.num_lora_modules, -1), ("--lora_bias", t.lora_bias, "none"),
                                     ("--use_rslora", t.use_rslora, False), ("--init_lora_weights", t.init_lora_weights, "true"),
                                     ("--loraplus_lr_ratio", t.loraplus_lr_ratio, None)):
            if value != default:
                errors.append(f"{flag} has no effect without --lora_enable or --vision_lora")
    errors += _lora_init_errors(t) + _virtual_token_errors(t) + _moe_flag_errors(t)
    if t.loraplus_lr_ratio is not None and not t.loraplus_lr_ratio > 0:
        errors.append(f"--loraplus_lr_ratio must be > 0 (LoRA+ recommends >= 1), got {t.loraplus_lr_ratio}")
    if t.num_lora_modules == 0 or t.num_lora_modules < -1:
        errors.append(f"--num_lora_modules must be -1 (all) or a positive count, got {t.num_lora_modules}")
    if t.num_lora_modules > 0 and not t.lora_enable:
        errors.append("--num_lora_modules limits the language model's LoRA; it needs --lora_enable")
    if t.bits != 16 and not t.any_lora:
        errors.append(f"--bits {t.bits} quantises frozen weights for QLoRA; add --lora_enable (full fine-tuning of "
                      "quantised weights is not possible)")
    if t.unfreeze_topk_llm < 0 or t.unfreeze_topk_vision < 0:
        errors.append("--unfreeze_topk_llm / --unfreeze_topk_vision must be >= 0")
    if t.unfreeze_topk_llm and not t.llm_frozen:  # --lora_enable is no way out next to an explicit --freeze_llm false
        errors.append("--unfreeze_topk_llm trains the top layers of a frozen LLM; "
                      + ("--freeze_llm false trains all of it (set --freeze_llm true, or drop --unfreeze_topk_llm)"
                         if t.freeze_llm is False else
                         "the LLM is not frozen (add --freeze_llm true or --lora_enable)"))
    if t.unfreeze_topk_vision and not t.vision_frozen:
        errors.append("--unfreeze_topk_vision trains the top blocks of a frozen vision tower; "
                      + ("--freeze_vision_tower false trains all of it (set --freeze_vision_tower true, or drop "
                         "--unfreeze_topk_vision)" if t.freeze_vision_tower is False else
                         "the tower is not frozen (add --freeze_vision_tower true or --vision_lora)"))
    if t.unfreeze_topk_llm and t.bits != 16:
        errors.append("--unfreeze_topk_llm cannot fully train quantised layers (--bits); use LoRA on them")
    vision_trains = not t.vision_frozen or t.vision_lora or t.unfreeze_topk_vision > 0
    if t.vision_lr is not None and not vision_trains:
        errors.append("--vision_lr is set but nothing in the vision tower trains (it is frozen, with no --vision_lora "
                      "and no --unfreeze_topk_vision)")
    if t.merger_lr is not None and t.freeze_merger:
        errors.append("--merger_lr is set but --freeze_merger true freezes the merger")
    llm_trains = not t.llm_frozen or t.lora_enable or t.unfreeze_topk_llm > 0
    if not (vision_trains or llm_trains or not t.freeze_merger or t.virtual_tokens):
        errors.append("the freeze flags leave nothing to train (--freeze_vision_tower, --freeze_merger, --freeze_llm); "
                      "unfreeze a part or add LoRA")
    return errors


def _moe_flag_errors(t: TuneArguments) -> list[str]:
    """The MoE flags on their own (against the family: `moe_problems`)."""
    errors = []
    if not t.lora_target_experts and not t.lora_enable:
        errors.append("--lora_target_experts false keeps the language model's LoRA off the routed experts; it needs "
                      "--lora_enable")
    if t.train_router and not t.llm_frozen:
        errors.append("--train_router trains the router of a frozen language model, but here the whole language "
                      "model trains, its router with it; " + ("--freeze_llm false asks for that: drop one of the two"
                                                              if t.freeze_llm is False else
                                                              "add --lora_enable or --freeze_llm true, or drop it"))
    if t.router_aux_loss_coef is not None and not t.router_aux_loss_coef >= 0:
        errors.append(f"--router_aux_loss_coef must be >= 0, got {t.router_aux_loss_coef}")
    return errors


def _virtual_token_errors(t: TuneArguments) -> list[str]:
    """--peft_type p_tuning / prompt_tuning: only the virtual tokens train, and only in the combinations proven to
    keep Qwen-VL's positions right (models/virtual_tokens.py); everything else is refused by name."""
    if not t.virtual_tokens:
        extra = [f for f, v in (("--num_virtual_tokens", t.num_virtual_tokens), ("--encoder_hidden_size", t.encoder_hidden_size),
                                ("--encoder_reparameterization_type", t.encoder_reparameterization_type)) if v is not None]
        return [f"{f} belongs to --peft_type p_tuning / prompt_tuning" for f in extra]
    errors = []
    kind = f"--peft_type {t.peft_type}"
    if t.num_virtual_tokens is None or t.num_virtual_tokens < 1:
        errors.append(f"{kind} needs --num_virtual_tokens >= 1")
    if t.peft_type != "p_tuning":
        errors += [f"{f} is a P-Tuning setting; it needs --peft_type p_tuning" for f, v in (
            ("--encoder_hidden_size", t.encoder_hidden_size),
            ("--encoder_reparameterization_type", t.encoder_reparameterization_type)) if v is not None]
    if t.any_lora:
        errors.append(f"{kind} trains virtual tokens instead of LoRA adapters; drop --lora_enable / --vision_lora")
    for flag, value in (("--freeze_llm false", t.freeze_llm is False),
                        ("--freeze_vision_tower false", t.freeze_vision_tower is False),
                        ("--unfreeze_topk_llm", t.unfreeze_topk_llm > 0), ("--unfreeze_topk_vision", t.unfreeze_topk_vision > 0),
                        ("--vision_lr", t.vision_lr is not None), ("--merger_lr", t.merger_lr is not None),
                        ("--bits", t.bits != 16), ("--use_liger", t.use_liger), ("--train_router", t.train_router)):
        if value:
            errors.append(f"{kind} trains only the virtual tokens on a frozen model in full precision; {flag} is not "
                          "supported with it")
    return errors


def _lora_init_errors(t: TuneArguments) -> list[str]:
    """--init_lora_weights: one of the initialisations PEFT's LoraConfig runs without extra data or configs."""
    from vlft.models.lora import lora_init_value, mutates_base

    try:
        value = lora_init_value(t.init_lora_weights)
    except ValueError as e:
        return [str(e)]
    if mutates_base(value) and t.bits != 16:
        return [f"--init_lora_weights {t.init_lora_weights} with --bits {t.bits}: PiSSA / OLoRA on quantised weights "
                "need PEFT's residual-model route, which vlft does not run; use --bits 16 or --init_lora_weights true"]
    return []


def resolved_args(*groups) -> dict:
    """Flat {flag: value} of every group, JSON-safe; usable again as --config."""
    out: dict = {}
    for g in groups:
        if isinstance(g, TrainingArguments):
            out.update(g.to_dict())
        else:
            out.update(dataclasses.asdict(g))
    return out
