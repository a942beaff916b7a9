"""`vlft <command> [flags]`: one table of command -> entry point.

The command line is checked before the command's module is imported (that import brings in torch and
transformers, seconds): a mistyped flag is reported at once with the nearest flag, and a hub model id that cannot
be downloaded (no network, not cached) is refused at once with what to do (vlft.utils.check_model_source).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys

from vlft.errors import VlftError
from vlft.stages import STAGES

# command -> (module whose main(argv) runs it, help), besides the training stages (vlft/stages.py: `commands()`)
TOOLS = {
    "merge": ("vlft.merge", "merge a LoRA run into a plain Hugging Face checkpoint"),
    "predict": ("vlft.predict", "generate answers for LLaVA records with a run, a merged or a base model"),
    "plot": ("vlft.plot", "draw a run's training curves (loss, lr, grad norm, tokens/s, eval, rewards) to a PNG"),
    "check-data": ("vlft.check", "validate a data file against a model's processor, without training"),
    "preview": ("vlft.preview", "write an HTML page showing records as training sees them: media, tokens, masks"),
    "convert": ("vlft.convert", "write ShareGPT, OpenAI messages, parquet or HF dataset data as LLaVA JSONL"),
    "plan": ("vlft.plan", "estimate peak GPU memory per part and whether a run fits, before launching it"),
    "tiny-model": ("vlft.models.tiny", "build the tiny offline Qwen-VL used by the demo and tests"),
}


def commands() -> dict[str, tuple[str, str]]:
    """Every command -> (module, help): one per training stage of STAGES (read now), then TOOLS."""
    return {**{name: (STAGES[name].entry, STAGES[name].help) for name in STAGES if STAGES[name].config}, **TOOLS}


COMMANDS = commands()  # as the table stands at import (tests, docs); main() reads commands() each time

_MODEL, _DATA, _TUNE = "vlft.config:ModelArguments", "vlft.config:DataArguments", "vlft.config:TuneArguments"

# command -> "module:Class" of each argument dataclass it parses (vlft.config.parse_command), read from the source to
# check flag names before any import. The argparse commands (merge, plot, plan, tiny-model) check their own.
TOOL_FLAG_GROUPS = {
    "predict": ("vlft.predict:PredictArguments", _DATA),
    "check-data": ("vlft.check:CheckArguments", _MODEL, _DATA),
    "preview": ("vlft.preview:PreviewArguments", _MODEL, _DATA),
    "convert": ("vlft.convert:ConvertArguments",),
}


def flag_groups() -> dict[str, tuple[str, ...]]:
    """command -> the "module:Class" of each argument dataclass it parses: a training stage's are the shared groups
    and its config (STAGES), the tools' TOOL_FLAG_GROUPS."""
    stages = {name: (_MODEL, _DATA, _TUNE, s.config) for name, s in STAGES.items() if s.config}
    return {**stages, **TOOL_FLAG_GROUPS}


FLAG_GROUPS = flag_groups()  # as the table stands at import; the checks below read flag_groups() each time

# command -> the flags that take a model id, checked against the hub before the import (vlft.utils.check_model_source).
# Not plan: it never downloads (a hub id names a row of its table of released sizes, or is refused at once).
TOOL_MODEL_FLAGS = {
    "check-data": ("--model_id",), "preview": ("--model_id",), "predict": ("--model", "--base_model"),
    "merge": ("--base_model",),
}


def model_flags(command: str) -> tuple[str, ...]:
    """The flags of `command` that take a model id: --model_id for every training stage, TOOL_MODEL_FLAGS else."""
    stage = STAGES.get(command)
    return ("--model_id",) if stage is not None and stage.config else TOOL_MODEL_FLAGS.get(command, ())

# Base classes that live outside the module that names them (vlft.config imports TrainingArguments from transformers'
# lazy top-level package): where their source is, relative to the package's folder.
_EXTERNAL_BASES = {"TrainingArguments": ("transformers", "training_args.py")}


def _usage() -> str:
    lines = ["usage: vlft <command> [flags]   (vlft <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in commands().items()]
    return "\n".join(lines)


def _source_tree(module: str) -> ast.Module:
    """The parsed source of `module`, found without importing it (a top-level package's spec imports nothing;
    vlft's own package __init__ is empty)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise LookupError(module)
    with open(spec.origin, encoding="utf-8") as f:
        return ast.parse(f.read())


def _default_is_true(value: ast.expr | None) -> bool:
    """`= True` or `= field(default=True, ...)`."""
    if isinstance(value, ast.Call):
        value = next((k.value for k in value.keywords if k.arg == "default"), None)
    return isinstance(value, ast.Constant) and value.value is True


def _class_fields(tree: ast.Module, name: str) -> dict[str, bool]:
    """{field: whether HfArgumentParser adds its negation, no_ + field (a bool defaulting to true)} for the annotated
    class attributes (the dataclass fields) of class `name` in `tree` and of its bases, followed through the same
    module, a `from vlft.x import Base` of the module, or _EXTERNAL_BASES; a field defined again overrides its bases'
    (earlier bases win, as in the MRO of these single-chain classes). Errs on the side of more names (ClassVar and
    init=False attributes are kept): an extra name only lets a bad flag through to the full parser, which refuses it."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if name not in classes:
        raise LookupError(name)
    node = classes[name]
    imported = {alias.asname or alias.name: (stmt.module, alias.name) for stmt in tree.body
                if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith("vlft.")
                for alias in stmt.names}
    fields: dict[str, bool] = {}
    for base in reversed(node.bases):
        base_name = base.id if isinstance(base, ast.Name) else None
        if base_name in classes:
            fields.update(_class_fields(tree, base_name))
        elif base_name in imported:  # a vlft class from another module (a stage's config on VlftArgumentsMixin)
            module, original = imported[base_name]
            fields.update(_class_fields(_source_tree(module), original))
        elif base_name in _EXTERNAL_BASES:
            package, filename = _EXTERNAL_BASES[base_name]
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.origin:
                raise LookupError(package)
            with open(os.path.join(os.path.dirname(spec.origin), filename), encoding="utf-8") as f:
                fields.update(_class_fields(ast.parse(f.read()), base_name))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            fields[stmt.target.id] = "bool" in ast.unparse(stmt.annotation) and _default_is_true(stmt.value)
    return fields


def known_flags(command: str) -> set[str] | None:
    """The flag names (without `--`, dashes as underscores) that `command`'s parser accepts, read from the source
    of its argument dataclasses: every field, the negation HfArgumentParser adds for a bool field that defaults to
    true, `config` and `help`. None for a command without dataclass groups or when a source cannot be read (the full parser then
    checks alone). tests/test_cli_speed.py holds this equal to the parser's own list."""
    groups = flag_groups().get(command)
    if not groups:
        return None
    names: set[str] = {"config", "help"}
    trees: dict[str, ast.Module] = {}
    try:
        for source in groups:
            module, cls = source.split(":")
            if module not in trees:
                trees[module] = _source_tree(module)
            fields = _class_fields(trees[module], cls)
            names |= set(fields) | {f"no_{field}" for field, negatable in fields.items() if negatable}
    except (LookupError, OSError, SyntaxError, ValueError):
        return None
    return names


# Flags of LLaMA-Factory / ms-swift that vlft spells differently or does without: what to write instead
PEER_FLAGS = {
    "cutoff_len": "LLaMA-Factory's name; here --max_seq_length",
    "model_name_or_path": "here --model_id",
    "dataset": "here --data_path (several files: a.json b.json#1000)",
    "dataset_dir": "here --data_path with the file's path, and --image_folder for relative media",
    "lora_target": "vlft targets every linear layer of the language model; --lora_namespan_exclude leaves some out, "
                   "--vision_lora adds the vision tower",
    "finetuning_type": "here --lora_enable true (LoRA) or nothing (full)",
    "template": "vlft renders with the model's own chat template",
    "train_type": "ms-swift's name; here --lora_enable true (LoRA) or nothing (full)",
    "freeze_vit": "ms-swift's name; here --freeze_vision_tower",
    "freeze_aligner": "ms-swift's name; here --freeze_merger",
}


def unknown_flag_error(flags: list[str], known) -> str:
    """One message for the unknown `flags` (as typed), each with the nearest known flag when one is close."""
    from vlft.utils import closest_flag

    parts = []
    for flag in flags:
        name = flag.lstrip("-").replace("-", "_")
        peer = PEER_FLAGS.get(name)
        near = closest_flag(name, known)
        parts.append(f"{flag} ({peer})" if peer else f"{flag} (did you mean --{near}?)" if near else flag)
    noun = "flag" if len(flags) == 1 else "flags"
    return f"unknown {noun} {', '.join(parts)}; run with --help for the list of flags"


def check_flag_names(command: str, argv: list[str]) -> None:
    """Refuse a flag `command` does not have, before its module is imported; flags count by their full names only
    (the parsers take no abbreviations). Raises VlftError with the nearest flag, or the vlft name of a flag another
    tool spells differently (PEER_FLAGS)."""
    known = known_flags(command)
    if known is None:
        return
    unknown = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or arg[1:2].isdigit() or arg[1:2] == "." or " " in arg:
            continue  # a value (negative numbers included; argparse reads one with a space as a value too)
        if i and argv[i - 1] == "--config":
            continue
        if arg == "-h":
            continue
        name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        if not arg.startswith("--") or name not in known:
            unknown.append(arg.split("=", 1)[0])
    if unknown:
        raise VlftError(unknown_flag_error(unknown, known))


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """The values given to `flag` on the command line (as `FLAG VALUE` or `FLAG=VALUE`)."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1:])
    return values


def check_model_flags(command: str, argv: list[str]) -> None:
    """The hub check (vlft.utils.check_model_source) of every model id given on the command line; ids from a
    --config file or a run's vlft_args.json are checked when they are loaded (vlft.models.loading)."""
    from vlft.utils import check_model_source

    for flag in model_flags(command):
        for value in _flag_values(argv, flag):
            check_model_source(value, flag)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    table = commands()
    if command not in table:
        from vlft.utils import closest_flag

        near = closest_flag(command, table)
        hint = f" (did you mean {near}?)" if near else ""
        print(f"vlft: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from vlft.utils import quiet_third_party

    quiet_third_party(rest)
    try:
        if not {"-h", "--help"} & set(rest):
            check_flag_names(command, rest)
            check_model_flags(command, rest)
        module = importlib.import_module(table[command][0])
        return module.main(rest) or 0
    except VlftError as err:
        print(f"vlft {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
