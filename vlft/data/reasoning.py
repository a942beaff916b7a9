"""Reasoning ("thinking") in answers: how a record writes it, what a chat template does with it, and the flags.

A record gives an answer's reasoning either inline, `<think>R</think>A` (LLaVA, ShareGPT, completions of R1-style
models), or in a field next to the answer, `reasoning_content` (OpenAI-style messages from DeepSeek / vLLM /
Qwen APIs; a LLaVA turn may carry it too). `split_reasoning` reads the inline form with the rule Qwen3 and Qwen3.5's
chat templates apply to it, so both forms give the template the same (reasoning, answer) pair and the same ids.

What a template does with reasoning is found by rendering it (`probe_template`), not from its name: whether it
renders `reasoning_content` in a think block, whether an answer without reasoning gets an empty block, whether its
generation prompt opens a block (thinking on by default), and which switches (`enable_thinking`,
`preserve_thinking`) it reads. `Thinking` holds the flags and `check_flags` refuses a flag the template cannot honour.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlft.errors import VlftError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_KEYS = ("reasoning_content", "reasoning")  # OpenAI-style field, then the newer vLLM / OpenRouter name


class ReasoningError(ValueError):
    """An answer whose reasoning cannot be read unambiguously; `hint` says what to write instead."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of an answer written with its reasoning inline; (None, text) when it has none.

    The rule is the Qwen3 / Qwen3.5 chat templates' (`content.split('</think>')`): the reasoning is what lies between
    `<think>` and `</think>`, newlines at its ends removed, and the answer what follows `</think>`, leading newlines
    removed. `opened=True` reads a completion generated after a prompt that already opened the think block (Qwen3.5's
    thinking generation prompt ends `<think>\\n`): everything before `</think>` is reasoning, and a completion with
    no `</think>` is unfinished reasoning with an empty answer.

    Raises ReasoningError for text the templates would silently rewrite: text before `<think>` (they drop it), a
    second `</think>`, or a `<think>` never closed (it would stay in the answer after an empty think block)."""
    if THINK_CLOSE not in text:
        if opened:
            return text.strip("\n"), ""
        if THINK_OPEN in text:
            raise ReasoningError("the answer opens <think> but never closes it",
                                 "close the reasoning with </think> before the answer")
        return None, text
    if text.count(THINK_CLOSE) > 1:
        raise ReasoningError(f"the answer holds {text.count(THINK_CLOSE)} </think> tags",
                             "give one reasoning block, <think>...</think>, before the answer")
    head, answer = text.split(THINK_CLOSE)
    if THINK_OPEN in head:
        before, head = head.split(THINK_OPEN, 1)
        if THINK_OPEN in head:
            raise ReasoningError("the answer opens <think> twice", "give one reasoning block, <think>...</think>")
        if before.strip() and not opened:
            raise ReasoningError(f"text before <think> ({before.strip()[:40]!r}), which the chat template drops",
                                 "start the answer with <think>, or move that text after </think>")
    # without <think> (R1-distill data, whose template put the tag in the prompt) the templates read everything
    # before </think> as reasoning, and so does vlft
    if THINK_OPEN in answer:
        raise ReasoningError("<think> after </think>", "give one reasoning block, <think>...</think>, before the answer")
    return head.strip("\n"), answer.lstrip("\n")


def prompt_opens_think(prompt: str) -> bool:
    """True when a generation prompt (text) ends inside an open think block, as Qwen3.5's thinking prompt
    (`...<|im_start|>assistant\n<think>\n`) does: its completion is then read with `split_reasoning(opened=True)`."""
    at = prompt.rfind(THINK_OPEN)
    return at >= 0 and THINK_CLOSE not in prompt[at:] and "<|im_start|>" not in prompt[at:]


def message_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant chat message: its `reasoning_content` (or `reasoning`) field, else the
    inline form (`split_reasoning`). Raises ReasoningError when both are given."""
    content = message.get("content") or ""
    for key in REASONING_KEYS:
        value = message.get(key)
        if isinstance(value, str):
            if THINK_CLOSE in content:
                raise ReasoningError(f"reasoning given twice: in '{key}' and inline (<think>...</think>) in the answer",
                                     f"keep one: the '{key}' field or the inline block")
            return value, content
    return split_reasoning(content)


@dataclass(frozen=True)
class Thinking:
    """The reasoning flags, by LLaMA-Factory's / ms-swift's / the chat templates' names.

    enable_thinking: passed to the chat template (as `apply_chat_template(..., enable_thinking=)` and vLLM's
        chat_template_kwargs do) in every render; decides whether a generation prompt opens a think block (GRPO,
        predict, DPO prompts). None: the template's own default.
    preserve_thinking: passed to the template: keep the reasoning of turns before the last user message (Qwen3.6's
        templates). None: the template's own default (Qwen3.5's drops it).
    train_empty_think: learn the empty think block a template puts before an answer without reasoning. Default off,
        as ms-swift's `ignore_empty_think`: the block is context (the prompt of thinking-off mode), not something to
        learn, and learning it on every plain answer teaches the model to skip its reasoning."""

    enable_thinking: bool | None = None
    preserve_thinking: bool | None = None
    train_empty_think: bool = False

    def template_kwargs(self) -> dict:
        return {k: v for k, v in (("enable_thinking", self.enable_thinking),
                                  ("preserve_thinking", self.preserve_thinking)) if v is not None}

    @classmethod
    def from_args(cls, args) -> Thinking:
        return cls(getattr(args, "enable_thinking", None), getattr(args, "preserve_thinking", None),
                   bool(getattr(args, "train_empty_think", False)))


@dataclass(frozen=True)
class TemplateReasoning:
    """What a chat template does with reasoning, found by rendering it (`probe_template`)."""

    knows_reasoning: bool  # renders an answer's reasoning_content in a <think> block
    empty_block: bool  # puts an empty <think></think> block before an answer without reasoning
    thinks_by_default: bool  # its own generation prompt ends inside an open <think> block
    keeps_history: bool  # renders the reasoning of turns before the last user message (with the flags given)
    switches: frozenset[str]  # the reasoning variables it reads: enable_thinking, preserve_thinking


def probe_template(render, source: str, kwargs: dict | None = None) -> TemplateReasoning:
    """Render a few probe conversations with `render(messages, add_generation_prompt=..., **kwargs) -> str` (the
    tokenizer's apply_chat_template with the template fixed) and `source` (the template's text)."""
    kwargs = kwargs or {}
    user = {"role": "user", "content": "q"}
    with_reasoning = render([user, {"role": "assistant", "content": "A1", "reasoning_content": "R1"}], **kwargs)
    plain = render([user, {"role": "assistant", "content": "A1"}], **kwargs)
    knows = "R1" in with_reasoning and THINK_OPEN in with_reasoning
    history = render([user, {"role": "assistant", "content": "A1", "reasoning_content": "R1"}, user,
                      {"role": "assistant", "content": "A2", "reasoning_content": "R2"}], **kwargs)
    prompt = render([user], add_generation_prompt=True)
    tail = prompt[prompt.rfind(THINK_OPEN):] if THINK_OPEN in prompt else ""
    return TemplateReasoning(
        knows_reasoning=knows,
        empty_block=knows and THINK_OPEN in plain,
        thinks_by_default=bool(tail) and THINK_CLOSE not in tail,
        keeps_history=knows and "R1" in history,
        switches=frozenset(s for s in ("enable_thinking", "preserve_thinking") if s in source),
    )


def check_flags(thinking: Thinking, probe: TemplateReasoning, what: str = "the model's chat template") -> None:
    """Refuse, with the reason, a reasoning flag `what` cannot honour (VlftError naming the flag)."""
    if thinking.enable_thinking is not None and "enable_thinking" not in probe.switches:
        raise VlftError(f"--enable_thinking: {what} has no thinking switch (it never reads enable_thinking), so the "
                        "flag would change nothing; leave it out" + ("" if probe.knows_reasoning else
                        ", or use a thinking model (Qwen3.5, Qwen3-VL-Thinking)"))
    if thinking.preserve_thinking is not None and "preserve_thinking" not in probe.switches:
        kept = "renders no reasoning"
        if probe.knows_reasoning:
            kept = ("keeps every turn's reasoning already" if probe.keeps_history else
                    "drops the reasoning of turns before the last user message and has no switch to keep it "
                    "(Qwen3.6's template has one, TRL's qwen3_6: preserve_thinking)")
        raise VlftError(f"--preserve_thinking: {what} {kept}; leave the flag out")
    if thinking.train_empty_think and not probe.empty_block:
        raise VlftError(f"--train_empty_think: {what} puts no empty think block before an answer without reasoning, "
                        "so there is none to learn; leave the flag out")
