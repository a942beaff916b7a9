"""GRPO with thinking models' completions (`<think>R</think>A`, or `R</think>A` after a prompt that opened the block):
the answer-scoring rewards (accuracy, count, choice, iou) score the answer alone, unfinished reasoning scores 0 and a
malformed completion never raises; `format` and TRL's `think_format` rule read an opened prompt's completion as if it
began with `<think>` (think_format against TRL's own function as the oracle); completions.jsonl rows and the
pre-flight table hold the reasoning and the answer apart."""
from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlft.train.grpo.rewards import (
    BUILTIN,
    accuracy_reward,
    check_rewards,
    choice_reward,
    count_reward,
    format_reward,
    iou_reward,
    load_reward_funcs,
    split_completion,
    think_format_reward,
)
from vlft.train.grpo.run import sample_completions
from vlft.train.grpo.trainer import GRPOTrainer

PLAIN = "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
OPENED = PLAIN + "<think>\n"  # Qwen3.5's thinking generation prompt
CLOSED = PLAIN + "<think>\n\n</think>\n\n"  # Qwen3.5 with enable_thinking=False: an empty block, closed


def _one(func, completion, prompt=PLAIN, **columns):
    out = func(prompts=[prompt], completions=[completion], completion_ids=[[1, 2]], **{k: [v] for k, v in columns.items()})
    assert isinstance(out, list) and len(out) == 1
    return out[0]


# ---------------------------------------------------------------------------------------------------------- accuracy

def test_accuracy_scores_the_answer_after_think():
    assert _one(accuracy_reward, "<think>\nlet me add\n</think>\n\n7", solution="7") == 1.0
    # a number (the right one) in the reasoning and a wrong answer
    assert _one(accuracy_reward, "<think>\n3 + 4 = 7\n</think>\n\n8", solution="7") == 0.0
    assert _one(accuracy_reward, "<think>\nmaybe 7\n</think>\n\n<answer>7</answer>", solution="7") == 1.0


def test_accuracy_after_an_opened_prompt():
    assert _one(accuracy_reward, "let me add\n</think>\n\n7", OPENED, solution="7") == 1.0
    assert _one(accuracy_reward, "3 + 4 = 7\n</think>\n\n8", OPENED, solution="7") == 0.0
    # no </think>: the reasoning did not end, there is no answer (not a match on the 7 inside it)
    assert _one(accuracy_reward, "7", OPENED, solution="7") == 0.0
    assert _one(accuracy_reward, "7", PLAIN, solution="7") == 1.0  # the same text from a model without thinking
    assert _one(accuracy_reward, "7", CLOSED, solution="7") == 1.0  # thinking off: the prompt closed the block


def test_prompts_are_read_per_completion():
    out = accuracy_reward(prompts=[OPENED, PLAIN, OPENED], completions=["7", "7", "x</think>7"], solution=["7"] * 3)
    assert out == [0.0, 1.0, 1.0]
    # no prompts (a direct call): read as not opened
    assert accuracy_reward(completions=["7", "<think>7</think>8"], solution=["7", "7"]) == [1.0, 0.0]


def test_unclosed_think_without_an_opened_prompt_scores_zero_and_does_not_raise():
    assert split_completion("<think>\nthere are 4") == ("<think>\nthere are 4", "")
    assert _one(count_reward, "<think>\nthere are 4", solution=4) == 0.0
    assert _one(accuracy_reward, "<think>4", solution="4") == 0.0


@pytest.mark.parametrize("text", [
    "<think>a</think>b</think>4",  # two </think>
    "<think>a<think>b</think>4",  # <think> twice
    "<think>a</think>4<think>",  # <think> after </think>
    "so <think>a</think>4",  # text before <think>
])
def test_malformed_completions_score_their_whole_text(text):
    assert split_completion(text) == (None, text)
    for name in ("accuracy", "count", "choice", "iou", "format", "think_format"):  # none raises
        out = BUILTIN[name](prompts=[PLAIN], completions=[text], completion_ids=[[1]], solution=["4"])
        assert len(out) == 1
    assert _one(count_reward, text, solution=4) == 1.0  # as before: the first integer of the whole text


def test_completions_without_tags_score_as_before():
    texts = ["7", "The answer is 7.", "<answer>7</answer>", "eight", "B", "[1, 2, 3, 4]"]
    for func, sol in ((accuracy_reward, "7"), (count_reward, 7), (choice_reward, "B"), (iou_reward, "[1, 2, 3, 4]")):
        with_prompts = func(prompts=[PLAIN] * len(texts), completions=texts, solution=[sol] * len(texts))
        assert with_prompts == func(completions=texts, solution=[sol] * len(texts))
        assert any(v == 1.0 for v in with_prompts)


# ------------------------------------------------------------------------------------------------ count, choice, iou

def test_count_scores_the_answer():
    assert _one(count_reward, "<think>\nI see 3, no, one more\n</think>\n\n4", solution=4) == 1.0
    assert _one(count_reward, "<think>\nmaybe 4\n</think>\n\n5", solution=4) == 0.0
    assert _one(count_reward, "I see 3, no, one more\n</think>\n\nfour", OPENED, solution=4) == 1.0
    assert _one(count_reward, "there are 4", OPENED, solution=4) == 0.0


def test_choice_scores_the_answer():
    assert _one(choice_reward, "<think>\nA looks wrong, maybe C\n</think>\n\nB", solution="B") == 1.0
    assert _one(choice_reward, "<think>\nThe answer is B\n</think>\n\nC", solution="B") == 0.0
    assert _one(choice_reward, "The answer is B", OPENED, solution="B") == 0.0


def test_iou_scores_the_answer():
    assert _one(iou_reward, "<think>\nfirst guess [0, 0, 5, 5]\n</think>\n\n[10, 20, 30, 40]",
                bbox=[10, 20, 30, 40]) == 1.0
    assert _one(iou_reward, "<think>\n[10, 20, 30, 40]\n</think>\n\nnone", bbox=[10, 20, 30, 40]) == 0.0
    assert _one(iou_reward, "a box\n</think>\n\n[10, 20, 30, 30]", OPENED, bbox=[10, 20, 30, 40]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------- formats

def test_format_with_and_without_an_opened_prompt():
    r1 = "<think>\nadd them\n</think>\n<answer>7</answer>"
    tail = "\nadd them\n</think>\n<answer>7</answer>"
    assert _one(format_reward, r1) == 1.0 and _one(format_reward, r1, OPENED) == 0.0  # opened twice
    assert _one(format_reward, tail, OPENED) == 1.0 and _one(format_reward, tail) == 0.0
    assert _one(format_reward, "add them <answer>7</answer>", OPENED) == 0.0  # never closed


THINK_FORMAT_TEXTS = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",
    "<think></think>",
    "<think>a</think>b</think>c",
    "<think>a<think>b</think>c",
    "<think>a</think>b<think>",
    " <think>a</think>b",
    "x<think>a</think>b",
    "a</think>b",
    "",
    "<think>\nline\n</think>\n\nanswer\nmore\n",
]


@pytest.mark.parametrize("text", THINK_FORMAT_TEXTS)
def test_think_format_is_trls_rule(text):
    from trl.rewards import think_format_reward as trl_think_format

    assert _one(think_format_reward, text) == trl_think_format([[{"content": text}]])[0]
    # after an opened prompt: TRL's rule on the completion with <think> put back in front
    assert _one(think_format_reward, text, OPENED) == trl_think_format([[{"content": "<think>" + text}]])[0]


def test_think_format_with_and_without_an_opened_prompt():
    assert _one(think_format_reward, "<think>\nR\n</think>\n\n7") == 1.0
    assert _one(think_format_reward, "R\n</think>\n\n7") == 0.0
    assert _one(think_format_reward, "R\n</think>\n\n7", OPENED) == 1.0
    assert _one(think_format_reward, "<think>\nR\n</think>\n\n7", OPENED) == 0.0  # a second <think>
    assert _one(think_format_reward, "R, unfinished", OPENED) == 0.0
    assert load_reward_funcs(["think_format"]) == [("think_format", think_format_reward)]


# ------------------------------------------------------------------------------------------------ pre-flight, logging

def _fake_data_and_encoder(prompt: str):
    sample = SimpleNamespace(id="q1", images=[], videos=[], columns={"solution": "7"}, messages=[])
    encoder = SimpleNamespace(render=lambda messages, add_generation_prompt: (prompt,),
                              tokenizer=lambda text, add_special_tokens: {"input_ids": list(range(len(text)))})
    return SimpleNamespace(samples=[sample], image_paths=[[]], video_sources=[[]]), encoder


@pytest.mark.parametrize("prompt", [PLAIN, OPENED])
def test_preflight_sample_and_table_show_reasoning_and_answer(prompt):
    data, encoder = _fake_data_and_encoder(prompt)
    samples = sample_completions(data, encoder)
    assert samples[0]["prompt"] == prompt
    assert samples[0]["completion"].startswith("<think>") == (prompt == PLAIN)  # the model writes no second <think>
    table = check_rewards(load_reward_funcs(["format", "think_format", "accuracy"]), None, samples)
    print(table)
    lines = table.splitlines()
    assert lines[1].split() == ["#", "id", "reasoning", "answer", "format", "think_format", "accuracy", "total"]
    assert "Looking at the input." in lines[2] and "<answer>7</answer>" in lines[2]
    assert lines[2].split()[-4:] == ["1", "1", "1", "3"]


def test_table_without_reasoning_keeps_the_completion_column():
    samples = [{"prompt": PLAIN, "completion": "7", "completion_ids": [1], "columns": {"solution": "7"}}]
    lines = check_rewards(load_reward_funcs(["accuracy"]), None, samples).splitlines()
    assert lines[1].split() == ["#", "completion", "accuracy", "total"]
    unfinished = [{**samples[0], "prompt": OPENED}]
    lines = check_rewards(load_reward_funcs(["accuracy"]), None, unfinished).splitlines()
    assert lines[1].split() == ["#", "reasoning", "answer", "accuracy", "total"]
    assert lines[2].split() == ["0", "7", '""', "0", "0"]


class _Accelerator:
    device = torch.device("cpu")
    is_main_process = True

    @staticmethod
    def gather(t):
        return t


def test_completions_jsonl_rows_hold_reasoning_and_answer(tmp_path):
    """GRPOTrainer._log_rollout on fabricated completions (the tiny models write no think tags)."""
    g = 4
    trainer = SimpleNamespace(
        args=SimpleNamespace(num_generations=g, scale_rewards="group", log_completions=True),
        accelerator=_Accelerator(), reward_funcs=[("accuracy", accuracy_reward)], _metrics=defaultdict(list),
        samples=[SimpleNamespace(index=0, id="q1", images=["a.png"], videos=[])],
        state=SimpleNamespace(global_step=0), completions_path=tmp_path / "completions.jsonl",
        _completions_trimmed=True)
    texts = ["<think>\nlet me add\n</think>\n\n7", "3 + 4 = 7\n</think>\n\n8", "still thinking about 7",
             "<think>a</think>b</think>7"]
    prompts = [OPENED] * g
    per_func = torch.tensor([[v] for v in accuracy_reward(prompts=prompts, completions=texts, solution=["7"] * g)])
    assert per_func.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    GRPOTrainer._log_rollout(trainer, [{"record": 0}], per_func, per_func[:, 0], [torch.ones(3)] * g, [False] * g,
                             texts, prompts)
    rows = [json.loads(line) for line in trainer.completions_path.read_text().splitlines()]
    assert [r["completion"] for r in rows] == texts  # the raw text is kept
    assert [(r["reasoning"], r["answer"]) for r in rows] == [
        ("let me add", "7"), ("3 + 4 = 7", "8"), ("still thinking about 7", ""), (None, "<think>a</think>b</think>7")]
    assert [r["rewards"]["accuracy"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert all(r["id"] == "q1" and r["step"] == 1 and r["images"] == ["a.png"] for r in rows)
