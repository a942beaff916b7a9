"""How `vlft grpo` cuts an epoch into optimizer steps (train/grpo/trainer.py: PromptStepSampler, epoch_plan): TRL's
rule (trl/trainer/utils.py RepeatSampler, batch_size = one step's prompts): the epoch's shuffled prompts in blocks
of one optimizer step, an incomplete last block dropped, every block yielded --num_iterations times. So every step
trains on as many completions as configured, and the start-up log says how many prompts each epoch leaves out.
End to end: 3 prompts at 2 a step train one step of 8 completions, not a second of 4; in that run a function
written for TRL's conversational shape (and trl.rewards.think_format_reward) gets it, a string function strings."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vlft.errors import VlftError
from vlft.train.grpo.run import run
from vlft.train.grpo.trainer import PromptStepSampler, epoch_plan, prompts_per_step


def args(per_device=8, generations=4, accumulation=1, world=1, iterations=1):
    return SimpleNamespace(per_device_train_batch_size=per_device, num_generations=generations,
                           gradient_accumulation_steps=accumulation, world_size=world, num_iterations=iterations)


def sampled(size, block, repeats, epoch=0, seed=0) -> list[int]:
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=epoch))
    sampler = PromptStepSampler(size, block, repeats, seed, trainer)
    order = list(sampler)
    assert len(order) == len(sampler)
    return order


def test_prompts_per_step_counts_micro_batches_accumulation_and_processes():
    assert prompts_per_step(args()) == 2
    assert prompts_per_step(args(per_device=16, generations=8, accumulation=3, world=4)) == 2 * 3 * 4


@pytest.mark.parametrize("size,block,repeats", [(3, 2, 1), (7, 2, 1), (7, 2, 3), (8, 4, 2), (5, 5, 1)])
def test_an_incomplete_last_block_is_dropped(size, block, repeats):
    for epoch in (0, 1):
        order = sampled(size, block, repeats, epoch)
        full = size // block * block
        assert len(order) == full * repeats
        blocks = [order[i:i + block] for i in range(0, len(order), block)]
        assert all(b == blocks[k - k % repeats] for k, b in enumerate(blocks))  # each block `repeats` times in a row
        distinct = blocks[::repeats]
        used = [i for b in distinct for i in b]
        assert len(set(used)) == full and set(used) <= set(range(size))  # no prompt twice, size % block left out


def test_the_order_and_so_the_prompts_left_out_change_with_the_epoch():
    orders = [sampled(7, 2, 1, epoch) for epoch in range(6)]
    left_out = [set(range(7)) - set(order) for order in orders]
    assert all(len(x) == 1 for x in left_out)
    assert len({frozenset(x) for x in left_out}) > 1  # not always the same prompt
    assert sampled(7, 2, 1, 3) == orders[3]  # the same epoch, the same order (resume)


def test_epoch_plan_numbers_and_words():
    steps, left, line = epoch_plan(3, args())
    assert (steps, left) == (1, 1)
    assert line.startswith("GRPO: 3 prompts, 2 a step: --per_device_train_batch_size 8 / --num_generations 4 = 2 a "
                           "micro-batch x 1 accumulation step(s) x 1 process(es): 1 optimizer step(s) per epoch; 1 "
                           "prompt(s) of each epoch's shuffled order are left out, as in TRL"), line
    assert "a multiple of 2 prompts" in line
    steps, left, line = epoch_plan(12, args(accumulation=2, iterations=3))
    assert (steps, left) == (9, 0) and "(3 rollouts, each trained on 3 times)" in line and "left out" not in line
    with pytest.raises(VlftError, match=r"holds 3 usable prompt\(s\), fewer than one optimizer step takes \(4 a step"
                                        r".*lower --gradient_accumulation_steps or --per_device_train_batch_size"):
        epoch_plan(3, args(accumulation=2))


def test_three_prompts_two_a_step_train_one_full_step(tiny_model_dir, tmp_path, capsys):
    """The issue's case: 3 usable prompts, 2 a step (8 completions of 4 per prompt). Before, a second step trained on
    the third prompt alone (4 completions) and said nothing."""
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{"id": f"p{i}", "prompt": q, "solution": "4"}
                                for i, q in enumerate(["What is two plus two?", "Name a colour.", "Tell me a fact."])]))
    (tmp_path / "sizes.py").write_text(
        "import json\n\ndef sizes(completions, id, trainer_state, **kwargs):\n"
        f"    with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as fh:\n"
        "        fh.write(json.dumps({'ids': id, 'completions': completions}) + '\\n')\n"
        "    return [0.0] * len(completions)\n")
    (tmp_path / "chat.py").write_text(  # written for TRL's conversational shape
        "import json\n\ndef chat(prompts, completions, **kwargs):\n"
        f"    with open({str(tmp_path / 'chat.jsonl')!r}, 'a') as fh:\n"
        "        fh.write(json.dumps({'prompts': prompts, 'completions': completions}) + '\\n')\n"
        "    return [float(len(c[0]['content'])) for c in completions]\n")
    _, trainer = run(["--model_id", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                      "--lora_enable", "true", "--lora_rank", "4", "--lora_alpha", "8", "--num_train_epochs", "1",
                      "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "2",
                      "--reward_funcs", f"{tmp_path / 'sizes.py'}:sizes", f"{tmp_path / 'chat.py'}:chat",
                      "trl.rewards:think_format_reward", "--report_to", "none", "--disable_tqdm",
                      "true", "--save_strategy", "no", "--log_completions", "false", "--seed", "0"])
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()][1:]  # after pre-flight
    assert trainer.state.global_step == 1 and trainer.state.max_steps == 1
    assert [len(c["ids"]) for c in calls] == [8]  # one step, 2 prompts x 4 completions
    assert len(set(calls[0]["ids"])) == 2
    assert trainer.reward_shapes == ["text", "conversational", "conversational"]
    chat = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()][-1]  # the step's call
    assert chat["completions"] == [[{"role": "assistant", "content": t}] for t in calls[0]["completions"]]
    assert [p[-1]["content"][-1]["text"] for p in chat["prompts"]] == [
        trainer.samples[int(i[1:])].messages[-1]["content"][-1]["text"] for i in calls[0]["ids"]]
    err = capsys.readouterr().err
    assert "GRPO: 3 prompts, 2 a step" in err and "1 prompt(s) of each epoch's shuffled order are left out" in err
