"""What the preference and reward stages cannot do correctly is refused at start-up, before the data or the model
loads, with the reason: packing (a record's rows share one prompt; the reward is read at each row's last token),
virtual tokens (proven for vlft sft only), PiSSA / OLoRA (the adapters-off reference would not be the starting model);
--train_empty_think (SFT's label rule); the reference-free pair losses with a reference-only flag."""
from __future__ import annotations

import importlib

import pytest
from conftest import REPO

from vlft.errors import VlftError

DATA = {"dpo": "dpo_demo.json", "kto": "kto_demo.json", "rm": "dpo_demo.json"}
REFUSALS = {
    "packing": (["--packing", "true"], "--packing is not available for"),
    "virtual_tokens": (["--peft_type", "p_tuning", "--num_virtual_tokens", "4"], "virtual tokens are proven for vlft sft"),
    "pissa": (["--lora_enable", "true", "--init_lora_weights", "pissa"], "--init_lora_weights pissa"),
    "empty_think": (["--train_empty_think", "true"], "--train_empty_think decides which tokens SFT learns"),
}


@pytest.mark.parametrize("what", list(REFUSALS))
@pytest.mark.parametrize("stage", list(DATA))
def test_a_stage_refuses_what_it_cannot_do_before_anything_loads(stage, what, tiny_model_dir, tmp_path, monkeypatch):
    import vlft.train.core.setup as setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(setup, "prepare_model", no_model)
    flags, message = REFUSALS[what]
    run = importlib.import_module(f"vlft.train.{stage}.run").run
    with pytest.raises(VlftError, match=message.replace("(", r"\(")):
        run(["--model_id", str(tiny_model_dir), "--data_path", str(REPO / "data_examples" / DATA[stage]),
             "--image_folder", str(REPO / "data_examples"), "--output_dir", str(tmp_path / "out"),
             "--report_to", "none", *flags])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--precompute_ref_log_probs", "true"], "nothing to precompute"),
    (["--ld_alpha", "0.5"], "--ld_alpha"),
])
def test_reference_free_losses_refuse_reference_flags(flags, message, tiny_model_dir, tmp_path):
    from vlft.train.dpo.run import run

    with pytest.raises(VlftError, match=message):
        run(["--model_id", str(tiny_model_dir), "--data_path", str(REPO / "data_examples" / "dpo_demo.json"),
             "--output_dir", str(tmp_path / "out"), "--loss_type", "orpo", *flags])
