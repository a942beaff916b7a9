"""One owner of what a run directory (and every checkpoint-N inside it) holds besides the weights: its file
names, the writing and the reading. The training stages and models/loading.py (`describe_trained`, `open_trained`:
what predict, merge and a reference open) go through here, never through file names of their own.

    output_dir/
      adapter_model.safetensors, adapter_config.json   LoRA runs (written by PEFT through the Trainer)
      model.safetensors, config.json                   full fine-tuning runs (written by the Trainer)
      non_lora_trainables.safetensors                   LoRA runs: the weights trained fully next to the adapter
      vlft_trained.json                                 what trained: the names above, the adapted modules
      vlft_args.json                                    the resolved arguments (reusable as --config)
      initial_adapter/                                  PiSSA / OLoRA runs: the adapter as created (PEFT's format,
                                                        init_lora_weights true), for merge's conversion to plain LoRA
      processor / tokenizer files, chat_template.jinja  written by the Trainer
      README.md                                         the model card: what trained on what, the final figures, the
                                                        commands that merge, serve and predict (`write_run_card`; in
                                                        a checkpoint-N, a short card pointing to them)

Why `vlft_trained.json`: merge must check the saved weights against what *did* train, not against a
re-run of the freezing and LoRA selection on today's code (which can drift from the code that trained).

Every name a run, a checkpoint, merge or predict writes lives here, as one constant below (each says who writes it
and who reads it); other modules import the constant and never spell the name (tests/test_run_names.py checks).
This module imports only the standard library at import time, so any module can import it without a cycle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# --- the names a run writes ---------------------------------------------------------------------------------------
# Every public str constant of this section is a file or folder name (a `{...}` field: a template, filled with
# str.format). tests/test_run_names.py fails when one is spelled as a literal anywhere else in vlft/.

# vlft's own files, in the run directory and in every checkpoint-N (written by `write_run_files` on each save)
ARGS_FILE = "vlft_args.json"  # the resolved arguments; read by `read_run_args` (merge, predict, preview, --config)
NON_LORA_FILE = "non_lora_trainables.safetensors"  # LoRA runs' fully trained weights; read by open_trained, a resume
TRAINED_FILE = "vlft_trained.json"  # what trained (`trained_record`); read by open_trained (`read_trained`)
INITIAL_ADAPTER = "initial_adapter"  # PiSSA / OLoRA: the adapter as created (folder); read by open_trained's conversion
CARD_FILE = "README.md"  # the model card (`checkpoint_card`, `write_run_card`); read by people and the Hub

# PEFT's and transformers' names for what their save_pretrained writes (peft.utils.constants CONFIG_NAME /
# SAFETENSORS_WEIGHTS_NAME, transformers.utils SAFE_WEIGHTS_NAME / SAFE_WEIGHTS_INDEX_NAME), spelled here so that
# vlft's readers need not import those packages
ADAPTER_CONFIG = "adapter_config.json"  # written by PEFT; read by describe_trained (`is_adapter_run`), virtual tokens
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # written by PEFT (and `write_initial_adapter`); read by open_trained
MODEL_WEIGHTS = "model.safetensors"  # a full model's single weights file (save_pretrained); read by models/extra_keys.py
MODEL_INDEX = "model.safetensors.index.json"  # a sharded model's weight map; written by save_pretrained, and updated
# by models/extra_keys.py `carry_extra_tensors` (merge, a full run's final save), which also writes these shards:
EXTRA_SHARD = "model-extra-{index:05d}-of-{count:05d}.safetensors"  # the base model's tensors transformers drops

# what a run writes into --output_dir beside the weights and checkpoints
LOG_FILE = "log.jsonl"  # every log entry, one JSON line each (train/core/callbacks.py MetricsFileCallback); read by people
COMPLETIONS_FILE = "completions.jsonl"  # GRPO's completions and rewards per step (train/grpo/trainer.py); read by people
REF_CACHE_DIR = "ref_log_probs"  # DPO's precomputed reference log-probs, `<key>.pt` inside (train/dpo/trainer.py
# ReferenceCache writes and reads them; train/core/launch.py removes the folder under --overwrite_output_dir)
PLOT_FILE = "training_curves.png"  # the curves (vlft/plot.py, at the end of every stage and `vlft plot`); read by plot
LOGGING_DIR = "runs"  # transformers' default TensorBoard logging_dir (integrations default_logdir); read by TensorBoard

# checkpoints (train/core/checkpoints.py publishes them; train/core/trainer.py stages them)
CHECKPOINT_PREFIX = "checkpoint-"  # `checkpoint-N`, N the global step: transformers' PREFIX_CHECKPOINT_DIR + "-"
STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: written by the Trainer (and train/core/trainer.py
# when it names the best checkpoint's final place); read by train/core/checkpoints.py (a complete checkpoint) and plot
RESUME_FILE = "vlft_resume.json"  # what must not change across a resume; written and read by train/core/checkpoints.py
ROLLOUTS_FILE = "vlft_rollouts_rank{rank}.pt"  # GRPO, inside a --num_iterations cycle: one per process; written and
# read by train/grpo/trainer.py
STAGING_DIR = ".vlft-staging"  # saves are written here and renamed into place (train/core/trainer.py, train/core/checkpoints.py)
FINAL_STAGING = "final"  # the final save's folder inside STAGING_DIR, moved into --output_dir (train/core/trainer.py)
WRITE_PROBE_PREFIX = ".vlft-write-test-"  # + the process id: rank 0's writability probe, removed at once
# (train/core/checkpoints.py check_writable; `user_files` ignores it)
LATEST = "latest"  # --resume_from_checkpoint's word for the newest complete checkpoint (train/core/checkpoints.py)

# a merged model's record of the media settings training used (it has no vlft_args.json); written by merge
# (data/processor_media.py write_media_record), read by describe_trained (`read_media_record`) for predict
MEDIA_FILE = "vlft_media.json"

# a reward model (`vlft rm`): its scalar head, beside the language model's own files in the run directory and in every
# checkpoint-N (the model's files stay those of an SFT run, so the shared loaders open them); written by
# train/rm/trainer.py, read by train/rm/model.py `load_reward_model` (and a resume)
REWARD_HEAD_WEIGHTS = "reward_head.safetensors"  # the head's weight [1, hidden] (key "weight"), float32
REWARD_HEAD_CONFIG = "reward_head.json"  # what the head reads: its shape, the pooling rule, the pad token

# What a run writes into --output_dir before its first checkpoint: the staging area of a killed save, DPO's cached
# reference log-probs, GRPO's completions log, the log lines, TensorBoard's event folders. A run killed before its
# first checkpoint leaves only these, and `latest` then starts it again from step 0 (train/core/checkpoints.py).
RUN_LEFTOVERS = frozenset({STAGING_DIR, REF_CACHE_DIR, COMPLETIONS_FILE, LOG_FILE, LOGGING_DIR})

_PEFT_PREFIX = "base_model.model."  # not a file: PEFT's prefix of the wrapped model's parameter names


def bare_name(name: str) -> str:
    """A parameter or module name of the bare model (PEFT's wrapper prefix removed)."""
    return name.removeprefix(_PEFT_PREFIX)


def non_lora_trainables(model, state_dict: dict | None = None) -> dict:
    """Trainable weights that are not LoRA tensors (merger, unfrozen tower...), keyed by the bare model's
    parameter names.

    Under DeepSpeed the Trainer hands over the gathered `state_dict` (ZeRO-3 partitions leave empty local
    tensors); its values are used then, and a trainable weight missing from it is an error."""
    from vlft.models.freezing import is_lora_param

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
    from vlft.models.freezing import is_lora_param

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
    # PEFT's save_pretrained has just written its template card (`[More Information Needed]` throughout); every
    # save gets the short card instead, and the finished run's directory the full one (`write_run_card`)
    (out / CARD_FILE).write_text(checkpoint_card(args, is_peft=is_peft))


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



def read_media_record(model_dir: str | os.PathLike) -> dict:
    """The media settings a merged model carries ({} when it has none: a base model, or merged before vlft
    recorded them)."""
    path = Path(model_dir) / MEDIA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# --- the model card (README.md) ---------------------------------------------------------------------------------
# PEFT's save_pretrained writes its template card into every save (twenty `[More Information Needed]`, and
# `pipeline_tag: text-generation` for a vision-language model). vlft writes its own after each save: a short one
# in every checkpoint (`checkpoint_card`, from write_run_files) and, when the run finishes, the full one in the run
# directory (`write_run_card`, from train/core/launch.py train_and_save). The front matter is the Hub's model-card
# metadata (huggingface_hub ModelCardData's fields: base_model, library_name, pipeline_tag, tags).
STAGE_NAMES = {"sft": "supervised fine-tuning (SFT)", "dpo": "preference tuning (DPO)",
               "grpo": "reinforcement learning with rewards (GRPO)", "kto": "preference tuning on labelled answers (KTO)",
               "rm": "reward modelling (Bradley-Terry, a scalar head)"}
_STAGE_UNITS = {"sft": "records", "dpo": "preference pairs", "grpo": "prompts", "kto": "labelled answers",
                "rm": "preference pairs"}
_VIRTUAL_NAMES = {"p_tuning": "P-Tuning", "prompt_tuning": "prompt tuning"}


def training_method(args: dict) -> str:
    """What kind of training a run's resolved arguments describe, in words: "full fine-tuning", "LoRA on the
    language model (rank 8, alpha 16)", "QLoRA (4-bit base) ...", "prompt tuning (20 virtual tokens)"."""
    peft_type = args.get("peft_type") or "lora"
    if peft_type != "lora":
        return f"{_VIRTUAL_NAMES.get(peft_type, peft_type)} ({args.get('num_virtual_tokens')} virtual tokens)"
    parts = [part for flag, part in (("lora_enable", "language model"), ("vision_lora", "vision tower")) if args.get(flag)]
    if not parts:
        return "full fine-tuning"
    kind = "DoRA" if args.get("use_dora") else "LoRA"
    if args.get("bits", 16) in (4, 8):
        kind = f"Q{kind} ({args['bits']}-bit base)"
    return f"{kind} on the {' and '.join(parts)} (rank {args.get('lora_rank')}, alpha {args.get('lora_alpha')})"


def _is_adapter(args: dict) -> bool:
    return bool(args.get("lora_enable") or args.get("vision_lora") or (args.get("peft_type") or "lora") != "lora")


def _hub_id(name) -> bool:
    """A Hub repository id ("Qwen/Qwen2-VL-2B-Instruct"), not a local path: the only kind the Hub's `base_model`
    metadata accepts."""
    import re

    return (isinstance(name, str) and not os.path.exists(name)
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None)


def _front_matter(args: dict, stage: str | None) -> list[str]:
    lines = ["---"]
    if _hub_id(args.get("model_id")):
        lines.append(f"base_model: {json.dumps(args['model_id'])}")
    lines += [f"library_name: {'peft' if _is_adapter(args) else 'transformers'}", "pipeline_tag: image-text-to-text",
              "tags:", "- vlft"]
    if stage:
        lines.append(f"- {stage}")
    return lines + ["---", ""]


def _data_files(args: dict) -> list[str]:
    """The --data_path entries as given, each with its `#N` / `#p` selection (data/mixture.py)."""
    value = args.get("data_path")
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] if value else []


def _first_data_file(files: list[str]) -> str:
    """The first data file without its selection: predict reads a file whole."""
    from vlft.data.mixture import data_files

    names = data_files(files) if files else []
    return names[0] if names else "DATA"


def checkpoint_card(args: dict, *, is_peft: bool) -> str:
    """The README.md of every save while a run trains (checkpoint-N; the run directory's is then replaced by
    `run_card` when the run finishes): what it is a save of, and how to resume from it, merge and predict."""
    data = ", ".join(f"`{f}`" for f in _data_files(args)) or "(not recorded)"
    lines = _front_matter(args, None) + [
        "# vlft checkpoint", "",
        f"A save made while a vlft run trained: base model `{args.get('model_id')}`, data {data}, "
        f"{training_method(args)}. The run directory's {CARD_FILE}, written when the run finishes, gives the final "
        f"figures; `{ARGS_FILE}` here holds every argument.", "",
        f"- resume: the run's command with `--resume_from_checkpoint` this folder (or `{LATEST}`: the newest complete "
        "checkpoint)"]
    mergeable = is_peft and (args.get("peft_type") or "lora") == "lora"
    if mergeable:
        lines.append("- merge: `vlft merge --adapter <this folder> --output <new folder>`, then `vllm serve <new folder>`")
    lines.append("- predict: `vlft predict --model <this folder> --data_path <data> --output <predictions.jsonl>`")
    return "\n".join(lines) + "\n"


def _figure(value) -> str:
    import math

    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "not logged"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _series(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if isinstance(h.get(key), (int, float)) and not isinstance(h.get(key), bool)]


def run_card(run_dir: str | os.PathLike, args: dict, *, stage: str | None, family: str | None, records: int | None,
             counts: dict[str, tuple[int, int]] | None, history: list[dict], summary: dict) -> str:
    """The finished run's README.md (markdown with the Hub's front matter), from: `args` the resolved arguments
    (vlft_args.json), `stage` sft / dpo / grpo, `family` the family's display name, `records` how many records
    (DPO: pairs, GRPO: prompts) trained after the checks, `counts` {part: (trainable, frozen)} parameters as
    models/freezing.py count_parameters gives them, `history` the Trainer's log_history, `summary` the
    end-of-run summary of train/core/launch.py train_and_save (steps, train_seconds, first_loss, last_loss,
    tokens_per_second). The commands name `run_dir` as an absolute path."""
    import shlex

    run = os.path.abspath(run_dir)
    q = shlex.quote
    adapter = _is_adapter(args)
    virtual = (args.get("peft_type") or "lora") != "lora"
    stage_name = STAGE_NAMES.get(stage or "", stage or "training")
    losses = args.get("loss_type") or []
    if stage == "dpo" and isinstance(losses, list) and losses and losses != ["sigmoid"]:  # TRL's names, e.g. ORPO
        stage_name = f"preference tuning ({', '.join(map(str, losses))} loss)"
    lines = _front_matter(args, stage)
    method = training_method(args)
    lines += [f"# {os.path.basename(run)}", "",
              f"{method[0].upper()}{method[1:]} of `{args.get('model_id')}`{f' ({family})' if family else ''}, "
              f"by {stage_name} with vlft. Every argument is in `{ARGS_FILE}`; the training curves are in "
              f"`{PLOT_FILE}` (`vlft plot {q(run)}` draws them again).", ""]
    lines += ["## Data", ""]
    files = _data_files(args)
    unit = _STAGE_UNITS.get(stage or "", "records")
    lines.append(f"- training data: {', '.join(f'`{f}`' for f in files) or '(not recorded)'}"
                 + (f", {records} {unit} after the checks" if records is not None else ""))
    if args.get("image_folder"):
        lines.append(f"- media folder: `{args['image_folder']}`")
    if args.get("eval_data_path"):
        lines.append(f"- evaluation data: `{args['eval_data_path']}`")
    lines.append("")

    lines += ["## What trained", "", f"{method}; learning rate {args.get('learning_rate')}.", ""]
    if counts:
        label = {"head": "head/embed"}
        full = [label.get(p, p) for p, (t, _) in counts.items() if t and not p.startswith("lora:")]
        frozen = [label.get(p, p) for p, (t, _) in counts.items() if not t and not p.startswith("lora:")]
        if full:
            lines += [f"Trained fully: {', '.join(full)}"
                      + (f" (next to the adapter, in `{NON_LORA_FILE}`; merge applies them)" if adapter else "")
                      + f". Frozen: {', '.join(frozen) or 'nothing'}.", ""]
        lines += ["| part | trainable | frozen |", "|---|---:|---:|"]
        for part, (t, f) in counts.items():
            lines.append(f"| {label.get(part, part)} | {t:,} | {f:,} |")
        total_t, total_f = sum(t for t, _ in counts.values()), sum(f for _, f in counts.values())
        lines += [f"| total | {total_t:,} | {total_f:,} |", "",
                  f"{100 * total_t / max(1, total_t + total_f):.2f}% of the parameters trained "
                  "(`lora:<part>`: the adapter's own tensors on that part).", ""]

    epochs = _series(history, "epoch")
    seconds = summary.get("train_seconds")
    lines += ["## Final figures", "",
              f"- steps: {summary.get('steps')}" + (f" ({epochs[-1]:.2f} epochs)" if epochs else ""),
              f"- training time: {seconds:.1f} s" if isinstance(seconds, (int, float)) else "- training time: not recorded",
              f"- loss: {_figure(summary.get('first_loss'))} at the first logged step, "
              f"{_figure(summary.get('last_loss'))} at the last"]
    for key, label in (("eval_loss", "evaluation loss (last)"), ("rewards/margins", "reward margin (last)"),
                       ("rewards/accuracies", "preference accuracy (last)"), ("accuracy", "pair accuracy (last)"),
                       ("eval_accuracy", "held-out pair accuracy (last)")):
        values = _series(history, key)
        if values:
            lines.append(f"- {label}: {_figure(float(values[-1]))}")
    rewards = _series(history, "reward")
    if rewards:
        lines.append(f"- mean reward: {_figure(float(rewards[0]))} at the first logged step, "
                     f"{_figure(float(rewards[-1]))} at the last")
    if summary.get("tokens_per_second"):
        lines.append(f"- throughput: {summary['tokens_per_second']:.0f} tokens/s (non-pad, all processes)")
    lines.append("")

    predict = f"vlft predict --model {q(run)} --data_path {q(args.get('eval_data_path') or _first_data_file(files))}"
    if args.get("image_folder"):
        predict += f" --image_folder {q(str(args['image_folder']))}"
    predict += " --output predictions.jsonl"
    lines += ["## Use it", "", "```bash"]
    if stage == "rm":
        lines += [f"vlft grpo --reward_funcs rm:{q(run)} ...   # scores each completion with its prompt's media",
                  *([f"vlft merge --adapter {q(run)} --output {q(f'{run}-merged')}   # carries reward_head.* along"]
                    if adapter else []),
                  f"# in Python: vlft.train.rm.model.load_reward_model({str(run)!r}, device='cuda', dtype='bf16'); "
                  f"the head is {REWARD_HEAD_WEIGHTS} + {REWARD_HEAD_CONFIG} next to the model's files"]
    elif virtual:
        lines += ["# virtual tokens are extra inputs, not weights: no merge, no vLLM; vlft predict loads them",
                  predict]
    elif adapter:
        merged = f"{run}-merged"
        lines += [f"vlft merge --adapter {q(run)} --output {q(merged)}   # [--dtype bf16]; the base model comes "
                  f"from {ARGS_FILE}",
                  f"vllm serve {q(merged)}   # an OpenAI-compatible server (pip install vllm; a GPU)",
                  predict + "   # with the adapter, no merge needed"]
    else:
        lines += [f"vllm serve {q(run)}   # the directory is the whole model (pip install vllm; a GPU)", predict]
    lines += ["```", ""]
    return "\n".join(lines)


def write_run_card(trainer, summary: dict) -> Path | None:
    """Write the finished run's README.md (`run_card`) into trainer.args.output_dir, on the process that saves;
    returns its path. A finished run never fails here: an error is a warning, the run stays saved."""
    from vlft.utils import log

    if not trainer.args.should_save:
        return None
    out = Path(trainer.args.output_dir)
    try:
        from vlft.models.freezing import count_parameters

        model = trainer.accelerator.unwrap_model(trainer.model)
        family = getattr(trainer, "family", None)
        dataset = trainer.train_dataset
        dataset = getattr(dataset, "dataset", dataset) if type(dataset).__name__ == "PackedDataset" else dataset
        stage = getattr(trainer.args, "stage_key", None)  # the stage's config (train/<stage>/config.py)
        text = run_card(out, trainer.vlft_args, stage=stage if stage in STAGE_NAMES else None,
                        family=getattr(family, "display_name", None),
                        records=len(dataset) if hasattr(dataset, "__len__") else None,
                        counts=count_parameters(model, family) if family is not None else None,
                        history=trainer.state.log_history, summary=summary)
        (out / CARD_FILE).write_text(text)
        return out / CARD_FILE
    except Exception as err:  # the run is saved: a missing card is not worth failing it
        log(f"warning: could not write {out / CARD_FILE} ({type(err).__name__}: {err}); the run itself is saved")
        return None
