"""The run directory's README.md (run_dir.py `run_card`, `checkpoint_card`): vlft's model card in place of PEFT's
empty template, in the finished run and in every checkpoint, and its merge command works as written."""
from __future__ import annotations

import re
import shlex

import pytest
from conftest import DEMO_DATA, DEMO_IMAGES

from vlft.run_dir import run_card

PEFT_PLACEHOLDER = "[More Information Needed]"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from vlft.train.sft.run import run

    out = tmp_path_factory.mktemp("runs") / "card-run"
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--lora_enable", "true",
                            "--lora_rank", "4", "--lora_alpha", "8", "--freeze_vision_tower", "true",
                            "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                            "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_strategy", "steps",
                            "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3",
                            "--disable_tqdm", "true", "--seed", "0"])
    return out, summary, trainer


def test_finished_lora_run_card_names_model_data_figures_and_commands(lora_run, tiny_model_dir):
    out, summary, trainer = lora_run
    card = (out / "README.md").read_text()
    assert PEFT_PLACEHOLDER not in card and "text-generation" not in card
    assert "pipeline_tag: image-text-to-text" in card and "library_name: peft" in card
    assert f"`{tiny_model_dir}` (Qwen2-VL)" in card
    assert "supervised fine-tuning (SFT)" in card and "- sft\n" in card
    assert f"`{DEMO_DATA}`, 10 records after the checks" in card and f"`{DEMO_IMAGES}`" in card
    assert "LoRA on the language model (rank 4, alpha 8)" in card
    assert "Trained fully: merger (next to the adapter, in `non_lora_trainables.safetensors`" in card
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert f"{losses[-1]:.4f} at the last" in card and f"{losses[0]:.4f} at the first" in card
    assert "- steps: 4 (" in card and summary["steps"] == 4
    # the per-part table's total is the model's trainable parameter count
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = re.search(r"^\| total \| ([\d,]+) \|", card, re.M)
    assert total and int(total.group(1).replace(",", "")) == trainable
    assert re.search(r"^\| lora:llm \| [1-9][\d,]* \| 0 \|", card, re.M)
    assert f"vlft merge --adapter {out} --output {out}-merged" in card
    assert f"vllm serve {out}-merged" in card and f"vlft predict --model {out} --data_path {DEMO_DATA}" in card


def test_checkpoint_cards_replace_peft_template(lora_run):
    out, _, _ = lora_run
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for c in checkpoints:
        card = (c / "README.md").read_text()
        assert PEFT_PLACEHOLDER not in card and card.startswith("---\n")
        assert "# vlft checkpoint" in card and "vlft merge --adapter <this folder>" in card


def test_card_merge_command_runs_as_written(lora_run, tmp_path):
    from vlft.cli import main as cli_main
    from vlft.run_dir import MEDIA_FILE

    out, _, _ = lora_run
    card = (out / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("vlft merge "))
    argv = shlex.split(line.split("#", 1)[0])[1:]
    argv[argv.index("--output") + 1] = str(tmp_path / "merged")  # the module's run directory stays as it is
    assert cli_main(argv) == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / MEDIA_FILE).is_file()


def _args(**over):
    args = {"model_id": "Qwen/Qwen2-VL-2B-Instruct", "data_path": "train.json", "learning_rate": 1e-5,
            "lora_enable": False, "vision_lora": False, "peft_type": "lora", "bits": 16}
    return {**args, **over}


def test_full_fine_tuning_card_serves_the_run_itself(tmp_path):
    history = [{"loss": 2.0, "step": 1, "epoch": 0.5}, {"loss": 1.25, "step": 2, "epoch": 1.0}]
    card = run_card(tmp_path / "run", _args(), stage="sft", family="Qwen2-VL", records=4,
                    counts={"llm": (10, 0), "vision": (0, 5)}, history=history,
                    summary={"steps": 2, "train_seconds": 3.5, "first_loss": 2.0, "last_loss": 1.25})
    assert 'base_model: "Qwen/Qwen2-VL-2B-Instruct"' in card and "library_name: transformers" in card
    assert "Full fine-tuning of" in card and "vlft merge" not in card
    assert f"vllm serve {tmp_path / 'run'}" in card and "1.2500 at the last" in card
    assert "- steps: 2 (1.00 epochs)" in card and "- training time: 3.5 s" in card
    assert "Trained fully: llm. Frozen: vision." in card
    assert "| total | 10 | 5 |" in card and "66.67% of the parameters trained" in card


def test_grpo_card_gives_reward_and_local_base_is_not_hub_metadata(tmp_path):
    history = [{"loss": 0.0, "reward": 0.25, "step": 1}, {"loss": 0.1, "reward": 0.75, "step": 2}]
    card = run_card(tmp_path, _args(model_id=str(tmp_path), lora_enable=True, lora_rank=8, lora_alpha=16),
                    stage="grpo", family=None, records=3, counts=None, history=history,
                    summary={"steps": 2, "train_seconds": 1.0, "first_loss": 0.0, "last_loss": 0.1})
    assert "base_model:" not in card  # a local path is no Hub id
    assert "3 prompts after the checks" in card and "mean reward: 0.2500 at the first logged step, 0.7500" in card
    assert "reinforcement learning with rewards (GRPO)" in card


def test_virtual_token_card_has_no_merge(tmp_path):
    card = run_card(tmp_path, _args(peft_type="prompt_tuning", num_virtual_tokens=20), stage="sft", family=None,
                    records=1, counts=None, history=[], summary={"steps": 0, "first_loss": float("nan")})
    assert "Prompt tuning (20 virtual tokens)" in card and "library_name: peft" in card
    assert "vlft merge" not in card and "vllm serve" not in card and "vlft predict --model" in card
    assert "not logged at the first" in card


def test_the_card_names_a_pair_loss_other_than_dpo_and_the_reward_models_accuracy(tmp_path):
    orpo = run_card(tmp_path / "run", _args(loss_type=["orpo"]), stage="dpo", family=None, records=4, counts=None,
                    history=[], summary={"steps": 2})
    assert "by preference tuning (orpo loss) with vlft" in orpo
    history = [{"step": 1, "loss": 0.7, "accuracy": 0.5}, {"step": 2, "loss": 0.2, "accuracy": 1.0}]
    rm = run_card(tmp_path / "run", _args(), stage="rm", family=None, records=4, counts=None, history=history,
                  summary={"steps": 2})
    assert "by reward modelling (Bradley-Terry, a scalar head) with vlft" in rm
    assert "- pair accuracy (last): 1" in rm and "--reward_funcs rm:" in rm and "vllm serve" not in rm
