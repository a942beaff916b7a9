"""`vlft dpo` end to end on the tiny model: the loss at step 0 is its closed form (policy == reference, LoRA and
full), the LoRA reference stays the starting model while a merger trains next to the adapters, precomputed and
online references give the same curve (also across a resume, which reloads the cache), training separates the
pairs, the flags behave, and the run directory merges like an SFT run's."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, demo_subset_file

from vlft.errors import VlftError
from vlft.train.dpo.run import run

DPO_DEMO = REPO / "data_examples" / "dpo_demo.json"
FOUR_PAIRS = ("image", "multi_image", "history", "text_only_2u1_flat")  # the demo's image and text pairs
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0"]
LORA = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16"]
# the reference runs (proofs 2 and 3): LoRA next to a fully trained merger, a constant learning rate so that a
# run cut at step 2 and resumed to step 4 follows the same schedule as an uninterrupted one
REFERENCE_RUN = [*LORA, "--freeze_merger", "false", "--freeze_vision_tower", "true", "--learning_rate", "1e-3",
                 "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "2", *COMMON]


def subset(tmp_path_factory, ids) -> str:
    """The demo pairs with these ids, media paths made absolute, in a new file."""
    return demo_subset_file(DPO_DEMO, ids, tmp_path_factory.mktemp("data") / "pairs.json")


def step_logs(trainer) -> list[dict]:
    """One entry per logged optimizer step (the end-of-training summary left out)."""
    return [h for h in trainer.state.log_history if "loss" in h]


def dpo(model_dir, out, *flags, data=DPO_DEMO):
    return run(["--model_id", str(model_dir), "--data_path", str(data), "--output_dir", str(out), *flags])


# ------------------------------------------------------------------ 1. step 0: policy == reference
@pytest.fixture(scope="module")
def step0_runs(tiny_model_dir, tmp_path_factory):
    """name -> trainer of one optimizer step on all six demo pairs (image, two images, video, history, text, an
    image-side pair) in one batch; built on first use."""
    flags = {
        "sigmoid": [*LORA, "--loss_type", "sigmoid"],
        "hinge": [*LORA, "--dpo_loss", "hinge"],  # 2U1's spelling
        "ipo": [*LORA, "--loss_type", "ipo", "--beta", "0.25"],
        "bco_pair": [*LORA, "--loss_type", "bco_pair"],
        "full_sigmoid": ["--freeze_vision_tower", "true", "--loss_type", "sigmoid"],
        "rpo": [*LORA, "--loss_type", "sigmoid,sft", "--loss_weights", "1", "0.5"],
    }
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp("runs") / f"step0-{name}"
            _, runs[name] = dpo(tiny_model_dir, out, *flags[name], "--max_steps", "1", "--save_strategy", "no",
                                "--per_device_train_batch_size", "6", *COMMON)
        return runs[name]

    return get


@pytest.mark.parametrize("name, expected", [
    ("sigmoid", math.log(2)),  # -log sigmoid(0)
    ("hinge", 1.0),  # relu(1 - 0)
    ("ipo", 1 / (4 * 0.25 ** 2)),  # (0 - 1 / (2 beta))^2 = 4 at beta 0.25 (0.5 would give hinge's 1)
    ("bco_pair", 2 * math.log(2)),  # -log sigmoid(0) - log sigmoid(-0)
    ("full_sigmoid", math.log(2)),  # full fine-tuning: the reference is a frozen copy
])
def test_step0_loss_is_the_closed_form(step0_runs, name, expected):
    from vlft.train.preference.reference import AdaptersOff, FrozenCopy

    trainer = step0_runs(name)
    assert isinstance(trainer.reference, FrozenCopy if name.startswith("full") else AdaptersOff)
    (first,) = step_logs(trainer)
    assert abs(first["loss"] - expected) < 1e-6, first
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert abs(first[key]) < 1e-6, (key, first)
    # the closed form holds because the log-ratios vanish, not because the log-probs do
    assert first["logps/chosen"] < -1 and first["logps/rejected"] < -1


def test_full_fine_tuning_reference_is_a_frozen_copy_of_the_start(step0_runs, tiny_model_dir):
    from vlft.models.loading import load_model

    trainer = step0_runs("full_sigmoid")
    reference = dict(trainer.reference.model.named_parameters())
    policy = dict(trainer.model.named_parameters())
    base, _ = load_model(str(tiny_model_dir))
    assert reference.keys() == policy.keys() and not any(p.requires_grad for p in reference.values())
    assert all(torch.equal(reference[n], p) for n, p in base.named_parameters())
    moved = [n for n, p in policy.items() if p.requires_grad and not torch.equal(p, reference[n])]
    assert any(".language_model.layers." in n for n in moved)  # the step trained the policy, not the copy


def test_2u1_dpo_loss_alias_selects_hinge(step0_runs):
    trainer = step0_runs("hinge")
    assert trainer.args.loss_type == ["hinge"]
    (first,) = step_logs(trainer)
    assert abs(first["loss"] - 1.0) < 1e-6  # sigmoid's would be log 2


def test_rpo_adds_the_weighted_nll_of_the_chosen_tokens(step0_runs):
    trainer = step0_runs("rpo")
    assert trainer.args.loss_type == ["sigmoid", "sft"] and trainer.args.loss_weights == [1.0, 0.5]
    (first,) = step_logs(trainer)
    dataset = trainer.train_dataset
    pairs = len(dataset)  # one batch holds them all
    chosen_tokens = sum(int(dataset[i]["chosen_mask"].sum()) for i in range(pairs))
    mean_nll = -first["logps/chosen"] * pairs / chosen_tokens  # logps/chosen: the mean over pairs of the sums
    assert mean_nll > 1
    assert abs(first["loss"] - (math.log(2) + 0.5 * mean_nll)) < 1e-5, first


def test_unknown_loss_type_is_refused_naming_the_flag(tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(VlftError, match="--loss_type: unknown 'sigmod'"):
        dpo(tiny_model_dir, out, *LORA, "--loss_type", "sigmod", "--max_steps", "1", *COMMON)
    assert not out.exists()


def test_packing_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "packed"
    with pytest.raises(VlftError, match="--packing is not available for DPO"):
        dpo(tiny_model_dir, out, *LORA, "--packing", "true", "--max_steps", "1", *COMMON)
    assert not out.exists()


# ------------------------------------------------------------------ 2. the LoRA reference is the starting model
@pytest.fixture(scope="module")
def online_run(tiny_model_dir, tmp_path_factory):
    """Five steps on the six demo pairs, two a step, online reference (adapters off + the merger's starting
    values)."""
    out = tmp_path_factory.mktemp("runs") / "online"
    _, trainer = dpo(tiny_model_dir, out, *REFERENCE_RUN, "--max_steps", "5", "--save_strategy", "no")
    return out, trainer


def test_lora_reference_stays_the_base_model_while_the_merger_trains(online_run, tiny_model_dir):
    from vlft.models.loading import load_model
    from vlft.train.dpo.loss import sequence_logps
    from vlft.train.dpo.trainer import completion_log_probs

    _, trainer = online_run
    model = trainer.model.eval()
    base, _ = load_model(str(tiny_model_dir))
    base.eval()
    base_params = dict(base.named_parameters())
    merger = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()
              if ".visual.merger." in n}
    assert merger and all(not torch.equal(p, base_params[n]) for n, p in merger.items())  # it trained

    dataset = trainer.train_dataset
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with torch.no_grad():
        expected = sequence_logps(*completion_log_probs(base, inputs))
        reference = trainer.reference_log_probs(model, inputs)
        policy = sequence_logps(*completion_log_probs(model, inputs))
        with model.disable_adapter():  # 2U1's reference: adapters off, but the merger as trained
            drifting = sequence_logps(*completion_log_probs(model, inputs))
    assert expected.shape == (2 * len(dataset),)
    assert (reference - expected).abs().max() < 1e-5
    # so that the comparison above could fail: the policy has moved, and so would a reference of adapters alone
    assert (policy - expected).abs().max() > 1e-2
    assert (drifting - expected).abs().max() > 1e-4
    # the reference pass put the trained merger back
    live = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if ".visual.merger." in n}
    assert all(torch.equal(live[n], p) for n, p in merger.items())


# ------------------------------------------------------------------ 3. precomputed reference, resume
@pytest.fixture(scope="module")
def precomputed_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "precomputed"
    _, trainer = dpo(tiny_model_dir, out, *REFERENCE_RUN, "--precompute_ref_log_probs", "true", "--max_steps", "5",
                     "--save_strategy", "no")
    return out, trainer


@pytest.fixture(scope="module")
def resumed_run(tiny_model_dir, tmp_path_factory):
    """The precomputed run cut at step 2 (a checkpoint there), then resumed from it up to step 4."""
    out = tmp_path_factory.mktemp("runs") / "resumed"
    flags = [*REFERENCE_RUN, "--precompute_ref_log_probs", "true"]
    _, first = dpo(tiny_model_dir, out, *flags, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    cache_stamp = first.ref_cache.path.stat().st_mtime_ns
    _, second = dpo(tiny_model_dir, out, *flags, "--max_steps", "4", "--save_strategy", "no",
                    "--resume_from_checkpoint", str(out / "checkpoint-2"))
    return first, second, cache_stamp


def test_precomputed_reference_gives_the_online_loss_curve(online_run, precomputed_run):
    online_out, online = online_run
    out, pre = precomputed_run
    assert pre.ref_cache.source == "computed"
    assert list((out / "ref_log_probs").iterdir()) == [pre.ref_cache.path]
    assert pre.ref_cache.values.shape == (6, 2) and torch.isfinite(pre.ref_cache.values).all()
    assert online.ref_cache is None and not (online_out / "ref_log_probs").exists()
    online_losses = [h["loss"] for h in step_logs(online)]
    pre_losses = [h["loss"] for h in step_logs(pre)]
    assert len(online_losses) == len(pre_losses) == 5
    assert max(abs(a - b) for a, b in zip(online_losses, pre_losses)) < 1e-6, (online_losses, pre_losses)
    assert max(online_losses) - min(online_losses) > 1e-2  # the curve moves: agreeing is not trivial


def test_resume_reloads_the_cache_and_continues_the_curve(resumed_run, precomputed_run):
    first, second, cache_stamp = resumed_run
    _, pre = precomputed_run
    assert first.ref_cache.source == "computed" and second.ref_cache.source == "loaded"
    assert second.ref_cache.path == first.ref_cache.path
    assert second.ref_cache.path.stat().st_mtime_ns == cache_stamp  # not rewritten
    assert torch.equal(second.ref_cache.values, first.ref_cache.values)
    assert torch.allclose(first.ref_cache.values, pre.ref_cache.values, rtol=0, atol=1e-6)
    assert second.state.global_step == 4
    uninterrupted = {h["step"]: h["loss"] for h in step_logs(pre)}
    resumed = {h["step"]: h["loss"] for h in step_logs(second)}
    assert {3, 4} <= resumed.keys()
    for step in (3, 4):
        assert abs(resumed[step] - uninterrupted[step]) < 1e-5, (step, resumed, uninterrupted)


# ------------------------------------------------------------------ 4. training separates the pairs
@pytest.fixture(scope="module")
def four_pair_run(tiny_model_dir, tmp_path_factory):
    data = subset(tmp_path_factory, FOUR_PAIRS)
    out = tmp_path_factory.mktemp("runs") / "four-pairs"
    _, trainer = dpo(tiny_model_dir, out, *LORA, "--per_device_train_batch_size", "4", "--max_steps", "10",
                     "--learning_rate", "5e-3", "--save_strategy", "no", *COMMON, data=data)
    return out, trainer


def test_ten_steps_raise_the_margin_and_rank_every_pair(four_pair_run):
    _, trainer = four_pair_run
    logs = step_logs(trainer)
    assert len(logs) == 10
    first, last = logs[0], logs[-1]
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    assert last["rewards/margins"] > first["rewards/margins"] + 0.1
    assert last["rewards/accuracies"] == 1.0
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert last["loss"] < math.log(2) - 0.05


# ------------------------------------------------------------------ 6. the run directory merges like an SFT run's
def test_run_dir_has_sft_shape_and_merges_into_a_plain_checkpoint(four_pair_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlft.merge import main as merge_main
    from vlft.train.dpo.loss import sequence_logps
    from vlft.train.dpo.trainer import completion_log_probs

    out, trainer = four_pair_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors",
                 "vlft_trained.json", "vlft_args.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    args = json.loads((out / "vlft_args.json").read_text())
    assert args["model_id"] == str(tiny_model_dir) and args["lora_enable"] is True
    assert args["loss_type"] == ["sigmoid"] and args["beta"] == 0.1
    trained = json.loads((out / "vlft_trained.json").read_text())
    assert trained["non_lora"] and all(n.startswith("model.visual.") for n in trained["non_lora"])
    assert trained["lora_modules"] and all(".language_model.layers." in n for n in trained["lora_modules"])

    merged_dir = tmp_path / "merged"
    assert merge_main(["--adapter", str(out), "--output", str(merged_dir)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    dataset = trainer.train_dataset
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with torch.no_grad():
        expected = sequence_logps(*completion_log_probs(trainer.model.eval(), inputs))
        got = sequence_logps(*completion_log_probs(merged, inputs))
        untrained = sequence_logps(*completion_log_probs(base, inputs))
    assert (got - expected).abs().max() < 1e-4
    assert (untrained - expected).abs().max() > 1e-2  # so the comparison above could fail
