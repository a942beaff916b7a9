"""`vlft check-data`: run a stage's data preparation (data/prepare.py) against a model's processor, without
loading the model or training: every record parsed, every image and video decoded, every sequence measured.

    vlft check-data --model_id DIR --data_path data.json [more.jsonl#1000 ...] --image_folder images/ \
        [--stage NAME]   (a row of vlft/stages.py: sft, dpo, grpo, predict, ...)

For SFT data and a thinking model (a chat template that renders reasoning in a think block, Qwen3.5's), it also
says how many records train on reasoning and how many on answers without it, how many turns' reasoning the template
leaves out (Qwen3.5's drops it before the last user message), and warns when most records would teach the model to
answer without reasoning (`reasoning_report`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlft.errors import VlftError
from vlft.stages import STAGES, stage_help
from vlft.utils import log

# check-data warns when more than this share of a thinking model's SFT records train on answers without reasoning
PLAIN_WARN_SHARE = 0.5
# the share of reasoning examples Unsloth's Qwen3 fine-tuning guide advises keeping so that the model keeps reasoning
# ("use a 75% reasoning to 25% non-reasoning dataset ratio"; docs.unsloth.ai, Qwen3: how to run and fine-tune)
KEEP_REASONING_SHARE = 0.75
# the seed of the #N / #p draws check-data reports (data/mixture.py): --seed's default in the training stages, so the
# mix it shows is the one a run without --seed takes
CHECK_SEED = 42


@dataclass
class CheckArguments:
    stage: str = field(default="sft", metadata={"help": stage_help() + ".", "choices": STAGES})  # read when parsing: every row
    truncation_mode: str = field(
        default="keep_start", metadata={"help": "Stages that cut over-long answers (dpo): cut them from their end "
                                                "(keep_start, the stage's default) or leave the record out (drop).",
                                        "choices": ["keep_start", "drop"]})


@dataclass(frozen=True)
class ReasoningCounts:
    """Reasoning in the trained answers of SFT records, as the chat template renders them."""

    records: int
    with_reasoning: int  # records with at least one trained answer whose reasoning is rendered (a think block with text)
    dropped_turns: int  # assistant turns that carry reasoning the template leaves out (history turns)
    dropped_records: int  # records with such a turn
    plain_text: int  # templates without reasoning: records whose answers carry <think> text, trained as answer text

    @property
    def without_reasoning(self) -> int:
        return self.records - self.with_reasoning


def count_reasoning(encoder, samples) -> ReasoningCounts:
    """Render every sample's messages with `encoder` (data/encoding.py ChatEncoder, built with the run's Thinking
    flags) and count, per record, whether a trained answer renders reasoning and which turns' reasoning is dropped
    (`Rendered.dropped`). Every assistant turn of an SFT record trains, so a rendered think block with text is
    trained reasoning."""
    from vlft.data.reasoning import message_reasoning

    with_reasoning = dropped_turns = dropped_records = plain_text = 0
    for sample in samples:
        if encoder.reasoning.knows_reasoning:
            rendered = encoder.render(sample.messages)
            with_reasoning += any(span.reasoning is not None for span in rendered.spans)
            dropped_turns += len(rendered.dropped)
            dropped_records += bool(rendered.dropped)
        else:
            plain_text += any(message_reasoning(m)[0] is not None for m in sample.messages if m["role"] == "assistant")
    return ReasoningCounts(len(samples), with_reasoning, dropped_turns, dropped_records, plain_text)


def _records(n: int) -> str:
    return f"{n} record" + ("" if n == 1 else "s")


def reasoning_report(counts: ReasoningCounts, probe, thinking) -> list[str]:
    """The lines check-data prints about reasoning; a line starting 'warning:' is a warning. `probe`: the template's
    TemplateReasoning; `thinking`: the Thinking flags in force. Nothing for a template without reasoning, except one
    line when records carry <think> text (trained as answer text)."""
    if not probe.knows_reasoning:
        if not counts.plain_text:
            return []
        return [f"reasoning: {counts.plain_text} of {_records(counts.records)} carry reasoning (<think>...</think> or "
                "reasoning_content), but this model's chat template has no think block: it trains as answer text"]
    lines = [f"reasoning (thinking chat template): {counts.with_reasoning} of {_records(counts.records)} train on "
             f"reasoning in their answers, {counts.without_reasoning} on answers without reasoning"]
    if counts.dropped_turns:
        if "preserve_thinking" in probe.switches:
            fix = "pass --preserve_thinking true (this chat template has that switch)"
        else:
            fix = ("use a chat template with a preserve_thinking switch (Qwen3.6's; TRL's qwen3_6) and pass "
                   "--preserve_thinking true")
        lines.append(f"reasoning: the chat template leaves out the reasoning of {counts.dropped_turns} turn(s) in "
                     f"{_records(counts.dropped_records)} (answers before the last user message): those answers train "
                     f"without it. To train it, {fix}, or split each conversation into one record per answer")
    if counts.records and counts.without_reasoning / counts.records > PLAIN_WARN_SHARE:
        share = counts.without_reasoning / counts.records
        empty = (" and its empty think block is learned (--train_empty_think)" if thinking.train_empty_think else "")
        lines.append(
            f"warning: {counts.without_reasoning} of {_records(counts.records)} ({share:.0%}) train this thinking "
            f"model on answers without reasoning{empty}: trained mostly on those, the model learns to answer without "
            "its think block and loses its reasoning. Unsloth's Qwen3 fine-tuning guide advises keeping about "
            f"{KEEP_REASONING_SHARE:.0%} of the examples with reasoning to preserve it: add reasoning to more answers "
            "(<think>...</think> before the answer, or a reasoning_content field), or mix in records with reasoning"
            + ("" if thinking.enable_thinking is False else
               ". If answers without reasoning are what you want, prompt with thinking off as well: --enable_thinking "
               "false in training and predict, enable_thinking=false in vLLM's chat_template_kwargs"))
    return lines


def quick_reasoning_counts(encoder, samples) -> ReasoningCounts:
    """`count_reasoning` without rendering (for start-up at any data size): a record trains on reasoning when its
    last answer carries some (the turn every Qwen3.5 template renders with its think block); dropped history
    reasoning is check-data's to report. `samples`: a list of samples, or data/prepare.py's PreparedData, whose
    stored REASONED flags answer without reading a record."""
    from vlft.data.prepare import _reasoned
    from vlft.data.store import REASONED

    count = samples.count_flag(REASONED) if hasattr(samples, "count_flag") else None
    if count is None:
        samples = getattr(samples, "samples", samples)
        count = sum(map(_reasoned, samples))
    n, samples = count, getattr(samples, "samples", samples)
    if encoder.reasoning.knows_reasoning:
        return ReasoningCounts(len(samples), n, 0, 0, 0)
    return ReasoningCounts(len(samples), 0, 0, 0, n)


def main(argv: list[str] | None = None) -> int:
    from vlft.config import DataArguments, ModelArguments, family_for, parse_args, validate
    from vlft.data.encoding import ChatEncoder
    from vlft.data.mixture import parse_data_paths, prepare_mixture
    from vlft.data.prepare import length_flag_of
    from vlft.data.reasoning import Thinking
    from vlft.data.store import CUT
    from vlft.models.loading import load_family, load_processor

    check_args, model_args, data_args = parse_args((CheckArguments, ModelArguments, DataArguments), argv or [],
                                                   prog="vlft check-data")
    if not model_args.model_id or not data_args.data_path:
        raise VlftError("vlft check-data needs --model_id and --data_path")
    parse_data_paths(data_args.data_path)  # every file there, every #N / #p readable, before the model's files load
    validate(model_args, data_args, family=family_for(model_args))
    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))  # pixel defaults in the family's units
    thinking = Thinking.from_args(data_args)
    stage = STAGES[check_args.stage]
    record_format = stage.record_format_for(data_args.max_seq_length, check_args)  # its own flags: check_args
    # each file checked and reported on its own, then the mix a run would take (with --seed's default, 42)
    prepared = prepare_mixture(
        data_args.data_path, record_format, seed=CHECK_SEED, processor=processor,
        image_folder=data_args.image_folder, media=media, max_seq_length=data_args.max_seq_length,
        reject_overlong=data_args.reject_overlong, skip_bad_samples=data_args.skip_bad_samples,
        **data_args.preparation(), length_flag=length_flag_of(data_args), thinking=thinking,
        max_bad_fraction=data_args.max_bad_fraction,
    )
    truncated = prepared.count_flag(CUT)  # set only by formats that cut over-long answers (DPO's keep_start)
    cut = f"; {truncated} with answers to be cut to {length_flag_of(data_args)}" if truncated else ""
    log(f"{check_args.stage} data: {prepared.summary()}{cut}")
    where = ", ".join(data_args.data_path)
    for line in stage.load("report")(prepared, check_args, where=where) if stage.report else ():
        log(line)
    if stage.reports_reasoning:  # stages that train on the file's answers, every assistant turn of them
        encoder = ChatEncoder(processor, thinking)
        for line in reasoning_report(count_reasoning(encoder, prepared.samples), encoder.reasoning, thinking):
            log(line)
    return 0
