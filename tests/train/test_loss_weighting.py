"""Every trained token weighs the same, however the global batch is split into micro-batches and processes.

The language-model loss of a step is the sum of its trained tokens' losses over all of them (the Trainer's
`num_items_in_batch`). Models whose forward takes that count (Qwen2-VL, Qwen2.5-VL) get it from the Trainer;
Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 declare `accepts_loss_kwargs = False`, and the Trainer then averages per
micro-batch means, so a token in a short micro-batch would weigh more than one in a long one. vlft rescales their
loss instead (train/core/trainer.py: `VlftTrainerMixin.compute_loss`). One step over the same 4 records as one micro-batch
of 4 or as 4 accumulated micro-batches of 1 must then log the same loss and move the weights the same way (SGD);
tests/distributed checks the same across processes."""
from __future__ import annotations

import json

import pytest
from conftest import DEMO_IMAGES, REPO, final_weights, max_weight_difference

from vlft.train.sft.run import run


@pytest.fixture(scope="module")
def four_records(tmp_path_factory):
    """4 demo records with different numbers of trained tokens (one image, two images, text, a long answer)."""
    records = json.loads((REPO / "data_examples" / "llava_demo.json").read_text())
    path = tmp_path_factory.mktemp("data") / "four.json"
    path.write_text(json.dumps([records[i] for i in (0, 2, 3, 8)]))
    return path


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5_moe"])
def test_accumulated_micro_batches_give_the_one_batch_step(family, tiny_model_factory, four_records, tmp_path):
    common = ["--model_id", str(tiny_model_factory(family)), "--data_path", str(four_records), "--image_folder",
              str(DEMO_IMAGES), "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type",
              "constant", "--save_strategy", "no", "--disable_tqdm", "true", "--lora_enable", "true", "--lora_rank", "4",
              "--lora_dropout", "0", "--seed", "0", "--weight_decay", "0.0"]
    one, _ = run(common + ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    four, _ = run(common + ["--output_dir", str(tmp_path / "four"), "--per_device_train_batch_size", "1",
                            "--gradient_accumulation_steps", "4"])
    diff = max_weight_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "four"))
    print(f"\n{family}: loss {one['first_loss']:.6f} (1 x 4) vs {four['first_loss']:.6f} (4 x 1); weights {diff:.2e}")
    assert abs(one["first_loss"] - four["first_loss"]) < 1e-5
    assert diff < 1e-5
