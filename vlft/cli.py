"""`vlft <command> [flags]`: one table of command -> entry point."""
from __future__ import annotations

import importlib
import sys

from vlft.errors import VlftError

COMMANDS = {
    "sft": ("vlft.train.sft", "supervised fine-tuning (full or LoRA) on LLaVA-format data"),
    "dpo": ("vlft.train.dpo", "direct preference optimisation (full or LoRA) on preference pairs"),
    "grpo": ("vlft.train.grpo", "GRPO (RL with reward functions) on prompts, full or LoRA"),
    "merge": ("vlft.merge", "merge a LoRA run into a plain Hugging Face checkpoint"),
    "predict": ("vlft.predict", "generate answers for LLaVA records with a run, a merged or a base model"),
    "plot": ("vlft.plot", "draw a run's training curves (loss, lr, grad norm, tokens/s, eval, rewards) to a PNG"),
    "check-data": ("vlft.check", "validate a data file against a model's processor, without training"),
    "preview": ("vlft.preview", "write an HTML page showing records as training sees them: media, tokens, masks"),
    "convert": ("vlft.convert", "write ShareGPT, OpenAI messages, parquet or HF dataset data as LLaVA JSONL"),
    "plan": ("vlft.plan", "estimate peak GPU memory per part and whether a run fits, before launching it"),
    "tiny-model": ("vlft.models.tiny", "build the tiny offline Qwen-VL used by the demo and tests"),
}


def _usage() -> str:
    lines = ["usage: vlft <command> [flags]   (vlft <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vlft: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except VlftError as err:
        print(f"vlft {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
