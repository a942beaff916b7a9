"""vlft/train/grpo/rewards.py: every built-in reward on right and wrong completions (the length and repetition penalties
also against TRL 1.16's own implementations as oracles), loading rewards from a file, a module and TRL, and the
pre-flight `check_rewards` (missing column, wrong length, NaN, errors, the table, TRL's rewards unchanged: those
reading strings or ids get strings, those reading TRL's conversational completions get that shape), and the `rm:PATH`
spec of a reward model (parsed, checked before anything loads; `prompt_media` only to the functions that take it)."""
from __future__ import annotations

import math
import sys
import types

import pytest

from vlft.errors import VlftError
from vlft.train.grpo.rewards import (
    BUILTIN,
    CONVERSATIONAL,
    TEXT,
    accuracy_reward,
    check_rewards,
    choice_reward,
    conversational_completion,
    count_reward,
    extract_answer,
    format_reward,
    iou_reward,
    load_reward_funcs,
    overlong_penalty,
    overlong_reward,
    parse_number,
    preflight_rewards,
    repetition_reward,
)


def _one(func, completion, **columns):
    """The reward of a single completion, called the way TRL calls it (keywords, one list entry per completion)."""
    cols = {k: [v] for k, v in columns.items()}
    out = func(prompts=["p"], completions=[completion], completion_ids=[[1, 2, 3]], **cols)
    assert isinstance(out, list) and len(out) == 1
    return out[0]


def test_builtin_names():
    assert set(BUILTIN) == {"format", "think_format", "accuracy", "count", "choice", "iou", "overlong", "repetition"}


# ------------------------------------------------------------------------------------------------------------ format

@pytest.mark.parametrize("text", [
    "<think>There are three circles.</think>\n<answer>3</answer>",
    "<think>\nabc\n</think> <answer> 3 </answer>\n",
    "  \n<think>multi\nline\nreasoning</think>\n\n<answer>\nB\n</answer>  ",
    "<think></think><answer>yes</answer>",  # empty reasoning (Qwen3 non-thinking) is allowed
])
def test_format_right(text):
    assert _one(format_reward, text) == 1.0


@pytest.mark.parametrize("text", [
    "<answer>3</answer>",  # no reasoning block
    "<think>three circles</think>",  # no answer block
    "<think>three circles</think> 3",
    "<answer>3</answer><think>after</think>",  # wrong order
    "Let me see. <think>x</think><answer>3</answer>",  # text before
    "<think>x</think><answer>3</answer> and more",  # text after
    "<think>x</think><answer>1</answer><answer>2</answer>",  # two answers
    "<think>x<think>y</think><answer>3</answer>",  # nested think
    "<think>x</think><answer>  </answer>",  # blank answer
    "<think>x</think>\n<answer>3",  # truncated
    "",
])
def test_format_wrong(text):
    assert _one(format_reward, text) == 0.0


def test_format_reads_conversational_completions():
    msg = [{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}]
    assert format_reward([msg, [{"role": "assistant", "content": "b"}]]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------- accuracy

def test_extract_answer():
    assert extract_answer("<think>maybe 2</think><answer> 3 </answer>") == "3"
    assert extract_answer("<answer>2</answer> no, <answer>4</answer>") == "4"  # the last one
    assert extract_answer("  7 ") == "7"  # no tags: the whole text
    assert extract_answer(r"<answer>so \boxed{\frac{1}{2}}</answer>") == r"\frac{1}{2}"


def test_parse_number():
    assert parse_number("3") == parse_number(" 3.0 ") == parse_number("3.") == 3.0
    assert parse_number("1,000") == 1000.0 and parse_number("12,345.5") == 12345.5
    assert parse_number("1/2") == 0.5 and parse_number("-2.5") == -2.5 and parse_number(".5") == 0.5
    assert parse_number("1e3") == 1000.0
    for text in ("1,5", "1,00", "50%", "$3", "three", "3 apples", "", "1/0", "e3"):
        assert parse_number(text) is None, text


@pytest.mark.parametrize("completion,solution", [
    ("<think>count them</think><answer>3</answer>", "3"),
    ("<think>x</think><answer> 3.0 </answer>", "3"),
    ("<answer>1,000</answer>", "1000"),
    ("<answer>0.5</answer>", "1/2"),
    ("<answer>0.1</answer>", "0.1000000001"),  # within 1e-6
    ("<answer>Paris.</answer>", "paris"),
    ("<answer>a  red\ncar</answer>", "A red car"),
    ("3", "3"),  # no tags: the whole completion
    ("<think>x</think><answer>3</answer>", "<answer> 3 </answer>"),  # the solution is extracted too
    (r"<answer>\boxed{42}</answer>", "42"),
    ("<answer>3</answer>", 3),  # a non-string solution is compared as text
])
def test_accuracy_right(completion, solution):
    assert _one(accuracy_reward, completion, solution=solution) == 1.0


@pytest.mark.parametrize("completion,solution", [
    ("<think>x</think><answer>4</answer>", "3"),
    ("<answer>3.001</answer>", "3"),
    ("<answer>The answer is 3</answer>", "3"),  # the answer block must hold only the answer
    ("<think>it is 3</think>", "3"),  # no answer block: the whole text, which is not "3"
    ("<answer>London</answer>", "Paris"),
    (r"<answer>\frac{1}{2}</answer>", "0.5"),  # LaTeX needs math_verify (not installed here; see the next test)
])
def test_accuracy_wrong(completion, solution, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails, as without the package
    assert _one(accuracy_reward, completion, solution=solution) == 0.0


def test_accuracy_none_without_solution():
    assert accuracy_reward(completions=["<answer>3</answer>"] * 2, solution=[None, "  "]) == [None, None]


def test_accuracy_uses_math_verify_when_installed(monkeypatch):
    """math_verify is optional: with it, LaTeX the plain rules miss is verified by it (a stand-in module here)."""
    calls = []

    def parse(text, **kwargs):
        calls.append(text)
        return [0.5] if text in (r"\frac{1}{2}", "0.5") else []

    fake = types.ModuleType("math_verify")
    fake.parse = parse
    fake.verify = lambda gold, answer, **kwargs: bool(answer) and gold == answer
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    assert _one(accuracy_reward, r"<answer>\frac{1}{2}</answer>", solution="0.5") == 1.0
    assert calls == ["0.5", r"\frac{1}{2}"]
    assert _one(accuracy_reward, r"<answer>\frac{1}{3}</answer>", solution="0.5") == 0.0


# ------------------------------------------------------------------------------------------------------------- count

@pytest.mark.parametrize("completion,solution", [
    ("<think>1, 2, 3</think><answer>3</answer>", 3),
    ("<answer>There are 3 cubes.</answer>", "3"),
    ("<answer>three</answer>", 3),
    ("<answer>Three objects</answer>", "<answer>3</answer>"),
    ("<answer>3.0</answer>", 3),
    ("<answer>12</answer>", "twelve"),
    ("<answer>0</answer>", 0),
])
def test_count_right(completion, solution):
    assert _one(count_reward, completion, solution=solution) == 1.0


@pytest.mark.parametrize("completion,solution", [
    ("<answer>4</answer>", 3),
    ("<answer>2.5</answer>", 2),
    ("<answer>many</answer>", 3),
    ("<answer>4 or 3</answer>", 3),  # the first integer counts
    ("<answer>x3</answer>", 3),  # a digit glued to a word is no number
])
def test_count_wrong(completion, solution):
    assert _one(count_reward, completion, solution=solution) == 0.0


def test_count_none_when_solution_is_not_whole():
    assert count_reward(completions=["3"] * 4, solution=[None, "abc", 2.5, True]) == [None] * 4


# ------------------------------------------------------------------------------------------------------------ choice

@pytest.mark.parametrize("completion,solution", [
    ("<answer>B</answer>", "B"),
    ("<answer>(B)</answer>", "B"),
    ("<answer>B.</answer>", "(B)"),
    ("<answer>b</answer>", "B"),
    ("<answer>The answer is B</answer>", "b"),
    ("<answer>the correct option is (c)</answer>", "C"),
    ("<answer>Answer: D</answer>", "D"),
    ("<answer>B. a red car</answer>", "B"),
    ("<think>A looks wrong</think><answer>I think B</answer>", "<answer>B</answer>"),
])
def test_choice_right(completion, solution):
    assert _one(choice_reward, completion, solution=solution) == 1.0


@pytest.mark.parametrize("completion,solution", [
    ("<answer>C</answer>", "B"),
    ("<answer>(A)</answer>", "B"),
    ("<answer>the answer is a cat</answer>", "A"),  # "a" here is an article, not a choice
    ("<answer>A or B</answer>", "B"),  # ambiguous: no choice
    ("<answer>no idea</answer>", "B"),
])
def test_choice_wrong(completion, solution):
    assert _one(choice_reward, completion, solution=solution) == 0.0


def test_choice_matches_option_text_and_none_without_letter():
    choices = ["a red car", "a blue bus", "a green truck"]
    assert _one(choice_reward, "<answer>A blue bus.</answer>", solution="B", choices=choices) == 1.0
    assert _one(choice_reward, "<answer>a red car</answer>", solution="B", choices=choices) == 0.0
    assert choice_reward(completions=["B", "B"], solution=[None, "42"]) == [None, None]


# --------------------------------------------------------------------------------------------------------------- iou

def test_iou_right_and_partial():
    box = [10, 20, 30, 40]
    assert _one(iou_reward, "<answer>[10, 20, 30, 40]</answer>", bbox=box) == 1.0
    assert _one(iou_reward, '<answer>{"bbox_2d": [10, 20, 30, 40], "label": "cat"}</answer>', bbox=box) == 1.0
    assert _one(iou_reward, "<|box_start|>(10,20),(30,40)<|box_end|>", solution="[10, 20, 30, 40]") == 1.0
    # half-overlapping: intersection 10x20 = 200, union 400 + 400 - 200 = 600
    assert _one(iou_reward, "<answer>[20, 20, 40, 40]</answer>", bbox=box) == pytest.approx(1 / 3)
    assert _one(iou_reward, "<answer>[10.5, 20, 30, 40]</answer>", solution="<answer>[10, 20, 30, 40]</answer>") \
        == pytest.approx(19.5 / 20)


def test_iou_wrong():
    box = [10, 20, 30, 40]
    assert _one(iou_reward, "<answer>[50, 60, 70, 80]</answer>", bbox=box) == 0.0  # disjoint
    assert _one(iou_reward, "<answer>[10, 20, 30]</answer>", bbox=box) == 0.0  # 3 numbers: no box
    assert _one(iou_reward, "<answer>the cat</answer>", bbox=box) == 0.0
    assert _one(iou_reward, "<answer>[30, 40, 10, 20]</answer>", bbox=box) == 0.0  # inverted: no area


def test_iou_prefers_bbox_then_solution_and_none_without_box():
    out = iou_reward(completions=["[0, 0, 10, 10]"] * 3, bbox=[[0, 0, 10, 10], None, None],
                     solution=["[50, 50, 60, 60]", [0, 0, 10, 10], "no box"])
    assert out == [1.0, 1.0, None]
    with pytest.raises(TypeError, match="bbox"):
        iou_reward(completions=["[0, 0, 1, 1]"])


# ---------------------------------------------------------------------------------------------------------- overlong

def test_overlong_penalty_values_and_trl_oracle():
    from trl.rewards import get_soft_overlong_punishment

    ids = [[0] * n for n in (0, 50, 80, 81, 90, 99, 100, 101, 500)]
    ours = overlong_penalty(100, 20)(completion_ids=ids)
    assert ours[:3] == [0.0, 0.0, 0.0] and ours[4] == -0.5 and ours[6] == -1.0 and ours[-1] == -1.0
    assert ours == pytest.approx(get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(ids))
    assert overlong_penalty(100).buffer == 25  # default: a quarter
    assert overlong_penalty(100, 0)(completion_ids=[[0] * 100, [0] * 101]) == [0.0, -1.0]


def test_overlong_builtin_reads_kwargs():
    ids = [[0] * 384, [0] * 448, [0] * 512, [0] * 600]
    assert overlong_reward(completion_ids=ids) == [0.0, -0.5, -1.0, -1.0]  # defaults 512 and 128
    assert overlong_reward(completion_ids=ids, max_completion_length=1000) == [0.0] * 4
    assert overlong_reward(completion_ids=[[0] * 90, [0] * 90], max_completion_length=[100, None],
                           overlong_buffer=[20, None]) == [-0.5, 0.0]


def test_overlong_bad_parameters():
    for args in ((0, None), (100, 200), (100, -1), ("100", None)):
        with pytest.raises(VlftError, match="overlong"):
            overlong_penalty(*args)


# -------------------------------------------------------------------------------------------------------- repetition

def test_repetition_values():
    assert _one(repetition_reward, "the cat sat on the mat") == 0.0
    assert _one(repetition_reward, "two words") == 0.0
    # 6 words -> 4 trigrams, 2 unique ("a b c", "b c a", then repeats): -(1 - 3/4)
    assert _one(repetition_reward, "a b c a b c") == pytest.approx(-0.25)
    assert _one(repetition_reward, "go " * 100) == pytest.approx(-(1 - 1 / 98))
    assert _one(repetition_reward, "Go go GO go") == pytest.approx(-0.5)  # casefolded


def test_repetition_matches_trl_on_word_ids():
    from trl.rewards import get_repetition_penalty_reward

    texts = ["a b c a b c", "one two three four", "x y x y x y x y z", "ab"]
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]
    assert repetition_reward(completions=texts) == pytest.approx(get_repetition_penalty_reward(3, -1.0)(ids))


# ----------------------------------------------------------------------------------------------------------- loading

REWARD_FILE = '''
def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completions]

def needs_bbox(completions, bbox, **kwargs):
    return [1.0 for _ in completions]

NOT_A_FUNCTION = 3
'''


def test_load_builtins_file_and_module(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    pkg = tmp_path / "modroot" / "vlft_test_rewardpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text("def exact(completions, solution, **kwargs):\n"
                                    "    return [float(c == s) for c, s in zip(completions, solution)]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "modroot"))
    monkeypatch.chdir(tmp_path)

    funcs = load_reward_funcs(["format", f"{path}:length_reward", "vlft_test_rewardpkg.scoring:exact",
                               "my_rewards.py:length_reward", "trl.rewards:get_soft_overlong_punishment"])
    names = [n for n, _ in funcs]
    assert names == ["format", "length_reward", "exact", "my_rewards.py:length_reward", "get_soft_overlong_punishment"]
    assert funcs[0][1] is BUILTIN["format"]
    assert funcs[1][1] is funcs[3][1]  # the same file (absolute, then relative) is imported once
    assert funcs[1][1](prompts=["p"], completions=["abcd"], completion_ids=[[1]]) == [4.0]
    assert funcs[2][1](completions=["x", "y"], solution=["x", "z"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec,words", [
    ("acuracy", ["unknown reward 'acuracy'", "accuracy", "file.py:function"]),
    ("nowhere/missing.py:f", ["nowhere/missing.py:f", "not found", "current directory"]),
    ("vlft_no_such_module_xyz:f", ["vlft_no_such_module_xyz:f", "not found", "PYTHONPATH"]),
    ("{file}:nope", [":nope'", "has no 'nope'", "length_reward", "needs_bbox"]),
    ("{file}:NOT_A_FUNCTION", ["NOT_A_FUNCTION", "not a function"]),
    ("{broken}:f", ["broken.py:f", "ZeroDivisionError", "fix the file"]),
    ("vlft.train.grpo.rewards:", ["empty"]),
])
def test_load_bad_specs_name_the_spec(spec, words, tmp_path):
    (tmp_path / "good.py").write_text(REWARD_FILE)
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    spec = spec.format(file=tmp_path / "good.py", broken=tmp_path / "broken.py")
    with pytest.raises(VlftError) as err:
        load_reward_funcs([spec])
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# -------------------------------------------------------------------------------------------------------- pre-flight

def _samples():
    return [
        {"prompt": "How many circles?", "completion": "<think>I see three.</think>\n<answer>3</answer>",
         "completion_ids": [1] * 12, "columns": {"id": "clevr-1", "solution": "3"}},
        {"prompt": "How many cubes?", "completion": "<answer>5</answer>",
         "completion_ids": [1] * 5, "columns": {"id": "clevr-2", "solution": "4"}},
    ]


def test_check_rewards_table():
    funcs = load_reward_funcs(["format", "accuracy", "count", "repetition"])
    table = check_rewards(funcs, [1.0, 2.0, 1.0, 0.5], _samples())
    print(table)
    lines = table.splitlines()
    assert "format=1" in lines[0] and "accuracy=2" in lines[0]
    header = lines[1].split()
    # a completion with reasoning: the reasoning and the answer in two columns (tests/train/test_grpo_reasoning.py)
    assert header == ["#", "id", "reasoning", "answer", "format", "accuracy", "count", "repetition", "total"]
    first, second = lines[2].split(), lines[3].split()
    assert first[1] == "clevr-1" and first[-5:] == ["1", "1", "1", "0", "4"]  # 1 + 2*1 + 1 + 0
    assert second[1] == "clevr-2" and second[-5:] == ["0", "0", "0", "0", "0"]
    assert "I see three.  <answer>3</answer>" in lines[2] and second[2:4] == ["-", "<answer>5</answer>"]
    # without reasoning: one excerpt of the completion, newlines flattened
    plain = [{**s, "completion": "The count:\n<answer>3</answer> and more words to cut"} for s in _samples()]
    lines = check_rewards(funcs, None, plain).splitlines()
    assert lines[1].split()[2] == "completion" and "The count: <answer>3</answer> and mor..." in lines[2]


def test_check_rewards_missing_column_names_function_argument_and_columns(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(REWARD_FILE)
    funcs = load_reward_funcs(["format", f"{path}:needs_bbox"])
    with pytest.raises(VlftError) as err:
        check_rewards(funcs, None, _samples())
    msg = str(err.value)
    assert "'needs_bbox'" in msg and "'bbox'" in msg and "id, solution" in msg

    def needs(bbox, **kwargs):
        return [0.0] * len(bbox)

    def inner(**kwargs):  # binds (all in **kwargs); the TypeError comes from the call itself
        return needs(**kwargs)

    with pytest.raises(VlftError, match=r"reward 'inner' needs the argument 'bbox'.*columns: id, solution"):
        check_rewards([("inner", inner)], None, _samples())


def test_check_rewards_builtin_needing_a_column():
    only_id = [{"prompt": "p", "completion": "x", "completion_ids": [1], "columns": {"id": 1}}]
    with pytest.raises(VlftError, match=r"'iou' needs the argument 'bbox'.*columns: id"):
        check_rewards(load_reward_funcs(["iou"]), None, only_id)
    with pytest.raises(VlftError, match=r"'accuracy' needs the argument 'solution'.*columns: id"):
        check_rewards(load_reward_funcs(["accuracy"]), None, only_id)


@pytest.mark.parametrize("returned,words", [
    ([1.0], ["'bad'", "expected length 2", "got 1"]),
    ((1.0, 2.0, 3.0), ["'bad'", "expected length 2", "got 3"]),
    (1.0, ["'bad'", "float", "list of 2"]),
    ([1.0, math.nan], ["'bad'", "nan", "index 1"]),
    ([math.inf, 1.0], ["'bad'", "inf", "index 0"]),
    ([1.0, "1.0"], ["'bad'", "index 1", "str"]),
])
def test_check_rewards_bad_returns(returned, words):
    def bad(prompts, completions, completion_ids, **kwargs):
        return returned

    with pytest.raises(VlftError) as err:
        check_rewards([("format", BUILTIN["format"]), ("bad", bad)], None, _samples())
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_check_rewards_errors_name_the_function():
    def crashes(completions, solution, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(VlftError, match=r"reward 'crashes' raised ZeroDivisionError: division by zero") as err:
        check_rewards([("crashes", crashes)], None, _samples())
    assert "test_rewards.py" in str(err.value)  # where it raised

    def no_kwargs(completions):
        return [0.0] * len(completions)

    with pytest.raises(VlftError, match=r"'no_kwargs'.*unexpected keyword argument.*\*\*kwargs"):
        check_rewards([("no_kwargs", no_kwargs)], None, _samples())


def test_check_rewards_weights_length():
    funcs = load_reward_funcs(["format", "accuracy"])
    with pytest.raises(VlftError, match=r"--reward_weights has 3 value\(s\) but there are 2"):
        check_rewards(funcs, [1.0, 1.0, 1.0], _samples())
    with pytest.raises(VlftError, match="--reward_weights"):
        check_rewards(funcs, [1.0, math.nan], _samples())
    assert "total" in check_rewards(funcs, [1.0, 1.0], _samples())


def test_check_rewards_call_is_trls():
    """Columns as keyword lists, None where a record lacks one, reserved keys dropped, trainer extras passed."""
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [None] * len(prompts)

    samples = _samples()
    samples[1]["columns"]["bbox"] = [1, 2, 3, 4]
    samples[0]["columns"]["completion"] = "dropped, as TRL drops it"
    table = check_rewards([("spy", spy)], None, samples)
    assert seen["prompts"] == ["How many circles?", "How many cubes?"]
    assert seen["completion_ids"] == [[1] * 12, [1] * 5]
    assert seen["id"] == ["clevr-1", "clevr-2"] and seen["solution"] == ["3", "4"]
    assert seen["bbox"] == [None, [1, 2, 3, 4]]
    assert "completion" not in seen
    assert seen["trainer_state"].global_step == 0 and callable(seen["log_extra"]) and callable(seen["log_metric"])
    assert "every reward returned None for 2 record(s)" in table


def test_check_rewards_async_reward():
    async def later(completions, **kwargs):
        return [0.25 for _ in completions]

    assert "0.25" in check_rewards([("later", later)], None, _samples())


def test_trl_rewards_through_check_rewards():
    """TRL's rewards that read completion_ids work unchanged, with strings."""
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

    funcs = [("soft_overlong", get_soft_overlong_punishment(max_completion_len=12, soft_punish_cache=8)),
             ("trl_repetition", get_repetition_penalty_reward(ngram_size=2))]
    checked = preflight_rewards(funcs, None, _samples())
    assert checked.shapes == [TEXT, TEXT]
    rows = [line.split() for line in checked.table.splitlines()[2:]]
    assert rows[0][-3:] == ["-1", "-0.9091", "-1.909"]  # 12 tokens: at the maximum; ids 1*12: 10 of 11 bigrams repeated
    assert rows[1][-3:] == ["-0.125", "-0.75", "-0.875"]  # 5 tokens: 1 into the 8-token buffer


def _chat_samples():
    """Two records with their prompt messages (an image prompt, as vlft's data holds it, and a text prompt)."""
    return [
        {"prompt": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many circles?<|im_end|>\n"
                   "<|im_start|>assistant\n",
         "messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}],
         "completion": "<think>\nI see three.\n</think>\nThe answer is \\boxed{3}", "completion_ids": [1] * 12,
         "columns": {"id": "clevr-1", "solution": "3"}},
        {"prompt": "How many cubes?", "completion": "The answer is \\boxed{5}", "completion_ids": [1] * 5,
         "columns": {"id": "clevr-2", "solution": "4"}},
    ]


def test_trls_conversational_rewards_get_trls_conversational_shape():
    """trl.rewards.think_format_reward reads completion[0]["content"]: the pre-flight finds that it raises on strings,
    calls it as TRL does for a conversational (vision-language) dataset, and keeps that shape for the run; vlft's
    built-ins and a function written for strings keep strings."""
    from trl.rewards import think_format_reward as trl_think_format

    seen = {}

    def strings_only(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [float(c.startswith("<think>")) for c in completions]  # str.startswith: fails on a list

    funcs = [*load_reward_funcs(["trl.rewards:think_format_reward", "think_format", "accuracy"]),
             ("strings_only", strings_only)]
    checked = preflight_rewards(funcs, None, _chat_samples())
    assert checked.shapes == [CONVERSATIONAL, TEXT, TEXT, TEXT]
    rows = [line.split() for line in checked.table.splitlines()[2:4]]
    # TRL's own rule and vlft's agree: the first completion has a think block, the second has none
    assert [r[-5:-1] for r in rows] == [["1", "1", "1", "1"], ["0", "0", "0", "0"]]
    assert trl_think_format([conversational_completion(s["completion"]) for s in _chat_samples()]) == [1.0, 0.0]
    assert seen["completions"] == [s["completion"] for s in _chat_samples()]  # strings, unchanged
    assert seen["prompts"] == [s["prompt"] for s in _chat_samples()]
    assert "conversational completions for think_format_reward" in checked.table
    assert check_rewards(funcs, None, _chat_samples()) == checked.table


def test_the_conversational_call_is_trls():
    """Prompts as TRL's message lists (every content a list of parts), completions as one assistant message each."""
    seen = {}

    def chat_spy(prompts, completions, completion_ids, solution, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution)
        return [len(c[0]["content"]) / 100 for c in completions]

    checked = preflight_rewards([("chat_spy", chat_spy)], None, _chat_samples())
    assert checked.shapes == [CONVERSATIONAL]
    assert seen["completions"] == [[{"role": "assistant", "content": s["completion"]}] for s in _chat_samples()]
    assert seen["prompts"] == [
        [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "How many cubes?"}]}]]  # no messages: the prompt text
    assert seen["completion_ids"] == [[1] * 12, [1] * 5] and seen["solution"] == ["3", "4"]
    assert _chat_samples()[0]["messages"][0]["content"] == "Answer briefly."  # the records' messages untouched


def test_trls_accuracy_rewards_run_or_name_their_missing_package():
    """trl.rewards.accuracy_reward / reasoning_accuracy_reward need math_verify: with it, they score TRL's
    conversational completions (the first answer is right); without it, the pre-flight stops with TRL's message
    and says to install it."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        installed = False
    else:
        installed = True
    for spec in ("trl.rewards:accuracy_reward", "trl.rewards:reasoning_accuracy_reward"):
        funcs = load_reward_funcs([spec])
        if installed:
            checked = preflight_rewards(funcs, None, _chat_samples())
            assert checked.shapes == [CONVERSATIONAL]
            assert [line.split()[-1] for line in checked.table.splitlines()[2:4]] == ["1", "0"]
        else:
            with pytest.raises(VlftError, match=r"(?s)raised ImportError: .*math_verify.*-> install the package"):
                preflight_rewards(funcs, None, _chat_samples())


def test_a_conversational_reward_that_fails_reports_its_own_error():
    """A function written for TRL's shape that has another bug: the error of the conversational call, with the string
    call's error beside it; a string function's own bug is reported from the string call."""
    def chat_bug(completions, **kwargs):
        return [float(c[0]["content"]) for c in completions]  # ValueError on text

    with pytest.raises(VlftError) as err:
        check_rewards([("chat_bug", chat_bug)], None, _chat_samples())
    message = str(err.value)
    assert "reward 'chat_bug' raised ValueError: could not convert string to float" in message
    assert "called with TRL's conversational completions" in message and "TypeError: string indices" in message

    def string_bug(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(VlftError, match=r"reward 'string_bug' raised ZeroDivisionError") as err:
        check_rewards([("string_bug", string_bug)], None, _chat_samples())
    assert "conversational" not in str(err.value)


def test_check_rewards_needs_functions_and_samples():
    with pytest.raises(VlftError, match="--reward_funcs"):
        check_rewards([], None, _samples())
    with pytest.raises(VlftError, match="no records"):
        check_rewards(load_reward_funcs(["format"]), None, [])


def test_load_module_whose_import_fails_names_the_missing_dependency(tmp_path, monkeypatch):
    (tmp_path / "vlft_test_needs_dep.py").write_text("import vlft_missing_dependency_xyz\n\ndef f(**kwargs):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(VlftError, match=r"reward 'vlft_test_needs_dep:f'.*install 'vlft_missing_dependency_xyz'"):
        load_reward_funcs(["vlft_test_needs_dep:f"])


# ------------------------------------------------------------------------------------------------- rm:PATH (vlft rm)

@pytest.mark.parametrize("spec, expected", [
    ("rm:output/rm_run", ("output/rm_run", None)),
    ("rm:output/rm_run@cpu", ("output/rm_run", "cpu")),
    ("rm:/runs/rm@cuda:1", ("/runs/rm", "cuda:1")),
    ("rm:/runs/rm@2", ("/runs/rm", "cuda:2")),
    ("rm:/runs/me@home/rm", ("/runs/me@home/rm", None)),  # an @ that names no device is part of the path
])
def test_rm_spec_names_a_path_and_an_optional_device(spec, expected):
    from vlft.train.grpo.rewards import parse_rm_spec

    assert parse_rm_spec(spec) == expected


def test_rm_spec_is_checked_before_anything_loads(tmp_path):
    from vlft.run_dir import REWARD_HEAD_WEIGHTS
    from vlft.train.grpo.rewards import RewardModelReward

    with pytest.raises(VlftError, match=r"reward 'rm:.*missing.*is no folder"):
        load_reward_funcs([f"rm:{tmp_path / 'missing'}"])
    with pytest.raises(VlftError, match=rf"holds no {REWARD_HEAD_WEIGHTS}, so it is no reward model.*vlft rm"):
        load_reward_funcs([f"rm:{tmp_path}"])
    (tmp_path / REWARD_HEAD_WEIGHTS).write_bytes(b"")  # the check reads no weights: the model loads at the pre-flight
    (name, func), = load_reward_funcs([f"rm:{tmp_path}@cpu"], device="cuda:0", dtype="bf16")
    assert name == "rm" and isinstance(func, RewardModelReward) and func._model is None
    assert (func.path, func.device, func.dtype) == (str(tmp_path), "cpu", "bf16")  # the spec's device wins
    (_, func), = load_reward_funcs([f"rm:{tmp_path}"], device="cuda:0")
    assert func.device == "cuda:0"  # else the policy's


def test_prompt_media_reach_only_the_functions_that_take_them():
    """A function with `takes_prompt_media` gets each sample's messages, images and videos (`prompt_media`, one per
    completion, keyed by sample); a TRL-style function never gets the extra keyword."""
    seen = {}

    def media_reward(completions, prompt_media, **kwargs):
        seen["media"] = prompt_media
        return [float(len(m.images)) for m in prompt_media]

    media_reward.takes_prompt_media = True

    def plain(completions, **kwargs):
        seen["plain"] = set(kwargs)
        return [0.0] * len(completions)

    samples = _samples()
    samples[0] |= {"images": ["/data/a.png", "/data/b.png"], "videos": [], "messages": [{"role": "user", "content": "q"}]}
    checked = preflight_rewards([("media", media_reward), ("plain", plain)], None, samples)
    first, second = seen["media"]
    assert (first.images, first.messages, first.key) == (["/data/a.png", "/data/b.png"], samples[0]["messages"], 0)
    assert (second.images, second.videos, second.key) == ([], [], 1)
    assert second.messages == [{"role": "user", "content": "How many cubes?"}]  # the default one-turn prompt
    assert "prompt_media" not in seen["plain"]
    assert checked.table.splitlines()[2].split()[-3] == "2"  # the media reward's value for the two-image record
