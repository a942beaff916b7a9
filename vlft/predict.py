"""Batched generation over LLaVA records, for a quick look at what a model now answers.

    vlft predict --model output/finetune_lora/latest --data_path val.json --image_folder images/ --output preds.jsonl

--model is anything vlft wrote, opened by models/loading.py `open_trained`: a run directory or a checkpoint-N in it
(LoRA: its base model and trained weights, merged as by vlft merge; virtual tokens: kept as inputs; full fine-tuning),
a merged model, or a base model id. When it holds vlft_args.json (a run) or
vlft_media.json (a model merged by vlft merge), the media settings of training (pixel budgets, frame sampling)
are used unless given here, and so are a run's reasoning flags (--enable_thinking, --preserve_thinking): a thinking
model is prompted as it trained. Each record's last gpt turn, when present, is the reference; the prompt is
everything before it. Writes one JSON line per record (id, prompt, prediction, reference, and the prediction split
into reasoning and answer: `prediction_row`) and prints the exact-match accuracy of the answers when references
exist.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlft.errors import VlftError
from vlft.utils import log


@dataclass
class PredictArguments:
    model: str | None = field(default=None, metadata={"help": "Run dir (adapter), merged/full model dir, or model id."})
    output: str | None = field(default=None, metadata={"help": "JSONL file to write the predictions to."})
    base_model: str | None = field(default=None, metadata={"help": "Base model of an adapter run (default: its own)."})
    batch_size: int = field(default=8, metadata={"help": "Records per generate() call."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling)."})
    dtype: str = field(default="fp32", metadata={"help": "Weights dtype.", "choices": ["fp32", "bf16", "fp16"]})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})


def load_for_inference(trained, *, dtype: str):
    """(model, family) to generate with: models/loading.py `open_trained` on what `describe_trained` found at
    --model (a LoRA run merged into its base, a virtual-token run in VirtualTokenModel; eval mode, KV cache on)."""
    from vlft.models.loading import open_trained

    opened = open_trained(trained, dtype=dtype)
    return opened.model, opened.family


# The reasoning flags that decide a prompt (train_empty_think only decides which tokens training learns)
THINKING_FIELDS = ("enable_thinking", "preserve_thinking")


def _media_from_run(data_args, run_args: dict, explicit: set[str], extra: tuple[str, ...] = ()):
    """The run's media settings (its vlft_args.json, or a merged model's vlft_media.json), and the `extra` flags it
    recorded (predict: THINKING_FIELDS), for every one of them not given on this command line."""
    from vlft.config import DataArguments
    from vlft.data.processor_media import MEDIA_FIELDS

    values = {f.name: getattr(data_args, f.name) for f in dataclasses.fields(DataArguments) if f.init}
    for name in (set(MEDIA_FIELDS) | set(extra)) - explicit:
        if name in run_args:
            values[name] = run_args[name]
    for legacy in ("min_pixels", "max_pixels"):
        values[legacy] = None
    return DataArguments(**values)


def prediction_row(*, record_id, index: int, prompt: str, completion: str, reference: str | None,
                   generation_prompt: str) -> dict:
    """One output line: the record's id and index, the text of its last user turn (`prompt`, media as <image> /
    <video>), the generated text (`prediction`, stripped), the `reference` (None without one), and the prediction
    read as `reasoning` and `answer`.

    The split is `split_reasoning`'s (the Qwen3 / Qwen3.5 chat templates' rule, vlft/data/reasoning.py), with
    `opened=prompt_opens_think(generation_prompt)`: after a prompt ending in an open think block (Qwen3.5 with
    thinking on: `...<|im_start|>assistant\n<think>\n`) everything before `</think>` is reasoning. A prediction
    without reasoning has `reasoning` None and `answer` the whole prediction; so has one the rule cannot read (an
    unclosed or second think block: a model's output is not the user's to fix), and its `reasoning_error` says what
    is wrong with it (None for every other row)."""
    from vlft.data.reasoning import ReasoningError, prompt_opens_think, split_reasoning

    text = completion.strip()
    error = None
    try:
        reasoning, answer = split_reasoning(text, opened=prompt_opens_think(generation_prompt))
    except ReasoningError as err:
        reasoning, answer, error = None, text, str(err)
    return {"id": record_id, "index": index, "prompt": prompt, "prediction": text, "reference": reference,
            "reasoning": reasoning, "answer": answer, "reasoning_error": error}


def reference_answer(message: dict) -> str:
    """The answer part of a reference (assistant) message, reasoning left out (`message_reasoning`; the whole
    content when its reasoning cannot be read), to compare with a prediction's `answer`."""
    from vlft.data.reasoning import ReasoningError, message_reasoning

    try:
        return message_reasoning(message)[1].strip()
    except ReasoningError:
        return (message.get("content") or "").strip()


def predict(pred_args: PredictArguments, data_args, trained=None) -> dict:
    """Generate for every record of --data_path and write the rows (`prediction_row`); returns the summary.
    `trained`: models/loading.py `describe_trained` of --model when the caller has it (main), else read here."""
    import torch
    from transformers import set_seed

    from vlft.constants import END_OF_REPLY_TOKENS
    from vlft.data.collator import SFTCollator
    from vlft.data.encoding import special_token_ids
    from vlft.data.mixture import single_data_path
    from vlft.data.prepare import length_flag_of, prepare_sft_data
    from vlft.data.reasoning import Thinking
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import describe_trained, load_processor

    data_path = single_data_path(  # a training run's several files or #N selection do not apply here
        data_args.data_path, command="vlft predict",
        why="it answers every record of the file, each output row numbered by its record there")
    out_path = Path(pred_args.output)
    if out_path.exists() and not pred_args.overwrite:
        raise VlftError(f"--output {out_path} already exists; choose another file or pass --overwrite true")
    trained = trained or describe_trained(pred_args.model, base_model=pred_args.base_model)
    processor = load_processor(trained.processor_source)
    media = data_args.media_settings(trained.family)  # pixel defaults in the family's units
    thinking = Thinking.from_args(data_args)
    checked = prepare_sft_data(data_path, processor=processor, image_folder=data_args.image_folder,
                               media=media, max_seq_length=data_args.max_seq_length,
                               reject_overlong=data_args.reject_overlong, skip_bad_samples=data_args.skip_bad_samples,
                               **data_args.preparation(), require_answer=False,
                               length_flag=length_flag_of(data_args), thinking=thinking)
    prompts, references, reference_answers = [], [], []
    for sample in checked.samples:
        last = sample.messages[-1]
        has_answer = last["role"] == "assistant"
        references.append(last["content"] if has_answer else None)
        reference_answers.append(reference_answer(last) if has_answer else None)
        prompts.append(dataclasses.replace(sample, messages=sample.messages[:-1] if has_answer else sample.messages))
    dataset = SFTDataset(prompts, checked.image_paths, processor, media=media,
                         video_sources=checked.video_sources, add_generation_prompt=True, thinking=thinking)

    set_seed(pred_args.seed)
    model, _ = load_for_inference(trained, dtype=pred_args.dtype)
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model  # (virtual tokens: a PeftModel)
    collate = SFTCollator.for_model(processor, bare, padding_side="left")
    tok = processor.tokenizer
    eos = special_token_ids(tok, END_OF_REPLY_TOKENS)
    generation = dict(max_new_tokens=pred_args.max_new_tokens, do_sample=pred_args.do_sample, eos_token_id=eos,
                      pad_token_id=tok.pad_token_id)
    if pred_args.do_sample:
        generation.update(temperature=pred_args.temperature, top_p=pred_args.top_p)

    rows = []
    for start in range(0, len(dataset), pred_args.batch_size):
        idx = list(range(start, min(start + pred_args.batch_size, len(dataset))))
        batch = collate([dataset[i] for i in idx])
        batch.pop("labels")
        with torch.no_grad():
            generated = model.generate(**batch, **generation)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        for i, seq in zip(idx, new_tokens):
            sample = checked.samples[i]
            user = [m for m in prompts[i].messages if m["role"] == "user"][-1]["content"]
            prompt_text = "".join(p.get("text", f"<{p['type']}>") for p in user)
            # <think> / </think> are not special tokens: the decoded text keeps them for the split
            rows.append(prediction_row(record_id=sample.id, index=sample.index, prompt=prompt_text,
                                       completion=tok.decode(seq, skip_special_tokens=True),
                                       reference=references[i], generation_prompt=generation_prompt(dataset, i)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    scored = [i for i, r in enumerate(rows) if r["reference"] is not None]
    summary = {"records": len(rows), "with_reference": len(scored), "output": str(out_path)}
    if scored:  # answers against answers: a thinking model's reasoning is not part of what is matched
        summary["exact_match"] = sum(rows[i]["answer"] == reference_answers[i] for i in scored) / len(scored)
        log(f"exact match {summary['exact_match']:.3f} on {len(scored)} records with a reference (answers, reasoning "
            "left out)")
    unreadable = [r["index"] for r in rows if r["reasoning_error"]]
    if unreadable:
        log(f"{len(unreadable)} predictions have reasoning the chat template's rule cannot read (records "
            f"{unreadable[:10]}{' ...' if len(unreadable) > 10 else ''}): their answer is the whole prediction; "
            "each row's reasoning_error says why")
    log(f"{len(rows)} predictions in {out_path}")
    return summary


def generation_prompt(dataset, i: int) -> str:
    """The text record i of a prediction dataset (SFTDataset with add_generation_prompt) is prompted with, media
    placeholders unexpanded: it ends where the template starts the answer (with thinking on, inside `<think>`)."""
    return dataset.encoder.render(dataset.samples[i].messages, add_generation_prompt=True).text


def main(argv: list[str] | None = None) -> int:
    from vlft.config import DataArguments, parse_command, validate
    from vlft.models.loading import describe_trained

    (pred_args, data_args), given = parse_command((PredictArguments, DataArguments), list(argv or []),
                                                  prog="vlft predict")
    if not pred_args.model or not data_args.data_path or not pred_args.output:
        raise VlftError("vlft predict needs --model, --data_path and --output")
    if data_args.train_empty_think:
        raise VlftError("--train_empty_think decides which tokens training learns; vlft predict learns nothing: "
                        "leave the flag out (--enable_thinking decides whether the prompt opens a think block)")
    trained = describe_trained(pred_args.model, base_model=pred_args.base_model)
    if trained.media:  # a run or a merged model: the settings training used
        data_args = _media_from_run(data_args, trained.media, given, extra=THINKING_FIELDS)
    if not {"max_seq_length", "max_length"} & given:
        data_args.max_seq_length = 10**9  # prediction keeps every record; the check still reports bad ones
    validate(data_args)
    predict(pred_args, data_args, trained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
