"""vlft predict with a thinking model (Qwen3.5's think template): --enable_thinking decides whether the prompt opens a
think block or closes an empty one, a run's recorded flag is used unless one is given, and every row splits the
prediction into reasoning and answer by the chat template's rule (vlft/data/reasoning.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES

import vlft.predict
from vlft.errors import VlftError
from vlft.predict import main as predict_main
from vlft.predict import prediction_row, reference_answer

THINK_ON_PROMPT = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n"
THINK_OFF_PROMPT = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PLAIN_PROMPT = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def row(completion: str, prompt: str) -> dict:
    return prediction_row(record_id="r", index=3, prompt="q", completion=completion, reference="7",
                          generation_prompt=prompt)


# --- the row: fabricated completions ------------------------------------------------------------------------------


def test_a_completion_after_an_opened_think_block_is_reasoning_up_to_the_close():
    got = row("R\n</think>\n\n7", THINK_ON_PROMPT)  # what the model writes after `...<think>\n`
    assert got == {"id": "r", "index": 3, "prompt": "q", "prediction": "R\n</think>\n\n7", "reference": "7",
                   "reasoning": "R", "answer": "7", "reasoning_error": None}
    # the same text as a whole block, `<think>\nR\n</think>\n\n7`, gives the same pair
    assert (row("<think>\nR\n</think>\n\n7", PLAIN_PROMPT)["reasoning"],
            row("<think>\nR\n</think>\n\n7", PLAIN_PROMPT)["answer"]) == ("R", "7")


def test_an_unfinished_thought_has_an_empty_answer():
    assert (row("R and more", THINK_ON_PROMPT)["reasoning"], row("R and more", THINK_ON_PROMPT)["answer"]) == \
        ("R and more", "")


@pytest.mark.parametrize("prompt", [THINK_OFF_PROMPT, PLAIN_PROMPT])
def test_a_plain_completion_has_no_reasoning(prompt):
    got = row("  7 \n", prompt)
    assert (got["prediction"], got["reasoning"], got["answer"], got["reasoning_error"]) == ("7", None, "7", None)
    # after a closed think block a `</think>` in the text is the model's own block, not the prompt's
    assert (row("R</think>7", prompt)["reasoning"], row("R</think>7", prompt)["answer"]) == ("R", "7")


@pytest.mark.parametrize(("completion", "prompt", "why"), [
    ("<think>\nR without end", THINK_OFF_PROMPT, "never closes"),
    ("R</think>7</think>8", THINK_ON_PROMPT, "2 </think>"),
    ("<think>R</think>7<think>", PLAIN_PROMPT, "after </think>"),
])
def test_unreadable_reasoning_leaves_the_whole_text_as_the_answer(completion, prompt, why):
    got = row(completion, prompt)
    assert (got["reasoning"], got["answer"]) == (None, completion)
    assert why in got["reasoning_error"]


def test_the_reference_answer_leaves_its_reasoning_out():
    assert reference_answer({"role": "assistant", "content": "<think>\nR\n</think>\n\n7 "}) == "7"
    assert reference_answer({"role": "assistant", "content": "7", "reasoning_content": "R"}) == "7"
    assert reference_answer({"role": "assistant", "content": " 7\n"}) == "7"
    assert reference_answer({"role": "assistant", "content": "7</think>8</think>"}) == "7</think>8</think>"


# --- end to end on the tiny Qwen3.5 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_5(tiny_model_factory):
    return tiny_model_factory("qwen3_5")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict-reasoning") / "data.json"
    records = {r["id"]: r for r in json.loads(DEMO_DATA.read_text())}
    path.write_text(json.dumps([records[i] for i in ("text_only", "single_image", "text_only_multi_turn_system")]))
    return str(path)


@pytest.fixture
def spy(monkeypatch):
    """Records the prompt ids each record was generated from (padding removed), the generation prompt texts the
    rows were split with, and predict's summary; `spy["script"]`, when set, is the text every generate() returns
    (a random tiny model writes random text)."""
    seen = {"ids": [], "prompts": [], "script": None}
    real_load, real_prompt, real_predict = (vlft.predict.load_for_inference, vlft.predict.generation_prompt,
                                            vlft.predict.predict)

    def load(*args, **kwargs):
        model, family = real_load(*args, **kwargs)
        generate = model.generate

        def recording(**kw):
            ids, mask = kw["input_ids"], kw["attention_mask"]
            seen["ids"] += [r[m.bool()].tolist() for r, m in zip(ids, mask)]
            if seen["script"] is None:
                return generate(**kw)
            tail = torch.tensor(seen["tokenizer"](seen["script"], add_special_tokens=False)["input_ids"])
            return torch.cat([ids, tail.expand(len(ids), -1)], dim=1)

        model.generate = recording
        return model, family

    def prompt(dataset, i):
        seen["prompts"].append(real_prompt(dataset, i))
        return seen["prompts"][-1]

    monkeypatch.setattr(vlft.predict, "load_for_inference", load)
    monkeypatch.setattr(vlft.predict, "generation_prompt", prompt)
    monkeypatch.setattr(vlft.predict, "predict", lambda *a: seen.setdefault("summary", real_predict(*a)))
    return seen


def predict_rows(model, data, out, *flags) -> list[dict]:
    assert predict_main(["--model", str(model), "--data_path", data, "--image_folder", str(DEMO_IMAGES), "--output",
                         str(out), "--batch_size", "2", "--max_new_tokens", "6", *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


ENDS = {"true": "<|im_start|>assistant\n<think>\n", "false": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}


@pytest.mark.parametrize("flag", ["true", "false", None])
def test_the_flag_decides_the_prompt_and_rows_split_what_the_model_wrote(qwen3_5, data, tmp_path, spy, flag):
    """The ids generate() gets end as the flag asks (unset: the template's own default, thinking on), the text the
    rows are split with is those ids' text, and a scripted completion comes back split in the rows."""
    from vlft.models.loading import load_processor

    tok = load_processor(str(qwen3_5)).tokenizer
    spy["tokenizer"] = tok
    thinking = flag != "false"
    spy["script"] = "R\n</think>\n\n7" if thinking else "7"
    flags = ["--enable_thinking", flag] if flag else []
    rows = predict_rows(qwen3_5, data, tmp_path / "p.jsonl", *flags)
    end = ENDS["true" if thinking else "false"]
    assert len(spy["ids"]) == len(rows) == 3
    for ids, text in zip(spy["ids"], spy["prompts"]):
        assert tok.decode(ids).endswith(end)
        assert text.endswith(end)
    assert tok.decode(spy["ids"][0]) == spy["prompts"][0]  # text_only: no media to expand, the very same text
    assert [(r["prediction"], r["reasoning"], r["answer"]) for r in rows] == \
        [(spy["script"], "R" if thinking else None, "7")] * 3
    assert spy["summary"]["exact_match"] == 0.0  # the demo's references are not "7"


def test_exact_match_compares_answers(qwen3_5, tmp_path, spy):
    from vlft.models.loading import load_processor

    spy["tokenizer"] = load_processor(str(qwen3_5)).tokenizer
    spy["script"] = "R\n</think>\n\n7"
    data = tmp_path / "d.json"
    data.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "7"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "8"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt",
                                                                        "value": "<think>\nS\n</think>\n\n7"}]},
    ]))
    rows = predict_rows(qwen3_5, str(data), tmp_path / "p.jsonl", "--enable_thinking", "true")
    assert [r["answer"] for r in rows] == ["7"] * 3
    assert spy["summary"]["exact_match"] == pytest.approx(2 / 3)


def test_rows_of_real_generation_hold_reasoning_and_answer(qwen3_5, data, tmp_path, spy):
    """Random text from the tiny model (thinking on: every prompt opens a think block) goes through decoding and
    the split without a crash; an unfinished thought is all reasoning."""
    rows = predict_rows(qwen3_5, data, tmp_path / "p.jsonl")
    assert len(rows) == 3
    for r in rows:
        assert list(r) == ["id", "index", "prompt", "prediction", "reference", "reasoning", "answer",
                           "reasoning_error"]
        if r["reasoning_error"]:
            assert (r["reasoning"], r["answer"]) == (None, r["prediction"])
        elif "</think>" not in r["prediction"]:
            assert (r["reasoning"], r["answer"]) == (r["prediction"], "")


@pytest.fixture(scope="module")
def full_run(qwen3_5, tmp_path_factory):
    """A full fine-tuning run's directory as training leaves it: the model, its processor and vlft_args.json, which
    recorded --enable_thinking false."""
    run = tmp_path_factory.mktemp("full-run") / "run"
    shutil.copytree(qwen3_5, run)
    (run / "vlft_args.json").write_text(json.dumps({"model_id": str(qwen3_5), "enable_thinking": False,
                                                    "preserve_thinking": None, "train_empty_think": False}))
    return run


def test_the_runs_recorded_flag_is_used_unless_one_is_given(full_run, data, tmp_path, spy):
    from vlft.models.loading import load_processor

    tok = load_processor(str(full_run)).tokenizer
    predict_rows(full_run, data, tmp_path / "recorded.jsonl")
    assert all(tok.decode(ids).endswith(ENDS["false"]) for ids in spy["ids"])
    spy["ids"].clear()
    predict_rows(full_run, data, tmp_path / "given.jsonl", "--enable_thinking", "true")
    assert len(spy["ids"]) == 3 and all(tok.decode(ids).endswith(ENDS["true"]) for ids in spy["ids"])


def test_recorded_reasoning_flags_reach_the_data_arguments(qwen3_5, tmp_path, monkeypatch):
    """Both prompt flags come from the run, each unless given; train_empty_think (training's) is not taken."""
    run = tmp_path / "run"  # a LoRA run's small files: describe_trained reads them, no weights are loaded
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run / "vlft_args.json").write_text(json.dumps({"model_id": str(qwen3_5), "enable_thinking": False,
                                                    "preserve_thinking": True, "train_empty_think": True}))
    seen = {}
    monkeypatch.setattr(vlft.predict, "predict", lambda pred_args, data_args, *_: seen.setdefault("data", data_args))
    predict_main(["--model", str(run), "--data_path", "d.json", "--output", str(tmp_path / "p.jsonl")])
    assert (seen["data"].enable_thinking, seen["data"].preserve_thinking, seen["data"].train_empty_think) == \
        (False, True, False)
    seen.clear()
    predict_main(["--model", str(run), "--data_path", "d.json", "--output", str(tmp_path / "p.jsonl"),
                  "--enable_thinking", "true", "--preserve_thinking", "false"])
    assert (seen["data"].enable_thinking, seen["data"].preserve_thinking) == (True, False)


def test_train_empty_think_is_refused(qwen3_5, tmp_path):
    with pytest.raises(VlftError, match="--train_empty_think.*leave the flag out"):
        predict_main(["--model", str(qwen3_5), "--data_path", "d.json", "--output", str(tmp_path / "p.jsonl"),
                      "--train_empty_think", "true"])
