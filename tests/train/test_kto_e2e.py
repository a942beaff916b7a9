"""`vlft kto` end to end on the tiny model: the loss at step 0 is its closed form (policy == reference; LoRA and
full, both loss types, weights that differ), ten steps on the demo raise the desirable records' rewards over the
undesirable ones, the precomputed reference gives the live reference's curve, the LoRA reference stays the starting
model while a merger trains next to the adapters, and the run merges and predicts like an SFT run."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from vlft.errors import VlftError
from vlft.train.kto.run import run

KTO_DEMO = REPO / "data_examples" / "kto_demo.json"
N_GOOD, N_BAD = 5, 4  # the demo's labels
# the per-frame video budget of the tests' DEMO_MEDIA: the demo's video stays a few dozen tokens
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
          "--video_min_pixels", "1024", "--video_max_pixels", "4096", "--video_max_total_pixels", "65536"]
LORA = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16"]
# LoRA next to a fully trained merger, every record in each step: ten steps, each on the whole demo
TRAINED_MERGER = [*LORA, "--freeze_merger", "false", "--freeze_vision_tower", "true", "--learning_rate", "5e-3",
                  "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "9", "--max_steps", "10",
                  "--save_strategy", "no", *COMMON]


def kto(model_dir, out, *flags, data=KTO_DEMO):
    return run(["--model_id", str(model_dir), "--data_path", str(data), "--output_dir", str(out), *flags])


def step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def full_batch(trainer) -> dict:
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


# ------------------------------------------------------------------ 1. step 0: policy == reference
@pytest.mark.parametrize("name, flags, weights", [
    ("lora-kto", [*LORA, "--desirable_weight", "1.2", "--undesirable_weight", "0.9"], (1.2, 0.9)),
    ("full-apo", ["--freeze_vision_tower", "true", "--loss_type", "apo_zero_unpaired", "--desirable_weight", "0.7"],
     (0.7, 1.0)),
])
def test_step0_loss_is_the_closed_form(tiny_model_dir, tmp_path, name, flags, weights):
    """Every log-ratio and the KL are 0: each record's loss is 1 - sigmoid(0) = 1/2 (kto's both sides, apo's
    desirable side) or sigmoid(0) = 1/2 (apo's undesirable side), times its label's weight."""
    from vlft.train.preference.reference import AdaptersOff, FrozenCopy

    _, trainer = kto(tiny_model_dir, tmp_path / name, *flags, "--max_steps", "1", "--save_strategy", "no",
                     "--per_device_train_batch_size", "9", *COMMON)
    assert isinstance(trainer.reference, AdaptersOff if name.startswith("lora") else FrozenCopy)
    labels = [bool(r["label"]) for r in json.loads(KTO_DEMO.read_text())]
    assert (sum(labels), len(labels) - sum(labels)) == (N_GOOD, N_BAD)
    desirable, undesirable = weights
    expected = 0.5 * (desirable * N_GOOD + undesirable * N_BAD) / (N_GOOD + N_BAD)
    (first,) = step_logs(trainer)
    assert abs(first["loss"] - expected) < 1e-6, (first, expected)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-6, (key, first)
    # the closed form holds because the log-ratios vanish, not because the log-probs do
    assert first["logps/chosen"] < -1 and first["logps/rejected"] < -1


def test_flags_are_checked_before_anything_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(VlftError, match="--undesirable_weight must be > 0"):
        kto(tiny_model_dir, out, *LORA, "--undesirable_weight", "0", *COMMON)
    with pytest.raises(VlftError, match="--packing is not available for KTO"):
        kto(tiny_model_dir, out, *LORA, "--packing", "true", *COMMON)
    assert not out.exists()


def test_a_file_with_one_label_is_refused_naming_it(tiny_model_dir, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"prompt": "Hi?", "completion": "Hello.", "label": True},
                                {"prompt": "Two plus two?", "completion": "Four.", "label": 1}]))
    with pytest.raises(VlftError, match=r"good\.json: all 2 usable records have label true.*label false"):
        kto(tiny_model_dir, tmp_path / "one-label", *LORA, *COMMON, data=good)


# ------------------------------------------------------------------ 2. training, precomputed reference, LoRA reference
@pytest.fixture(scope="module")
def online_run(tiny_model_dir, tmp_path_factory):
    """Ten steps on the whole demo, LoRA next to a trained merger, the live reference (adapters off + the merger's
    starting values), through the command line's own dispatch."""
    from vlft.cli import main

    out = tmp_path_factory.mktemp("runs") / "online"
    trainers = []
    import vlft.train.kto.run as stage

    real = stage.run
    stage.run = lambda argv: trainers.append(real(argv)) or trainers[-1]
    try:
        assert main(["kto", "--model_id", str(tiny_model_dir), "--data_path", str(KTO_DEMO), "--output_dir", str(out),
                     *TRAINED_MERGER]) == 0
    finally:
        stage.run = real
    return out, trainers[0][1]


@pytest.fixture(scope="module")
def precomputed_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "precomputed"
    # five steps: the curve compared is the online run's first five (the later flags override TRAINED_MERGER's)
    _, trainer = kto(tiny_model_dir, out, *TRAINED_MERGER, "--precompute_ref_log_probs", "true", "--max_steps", "5")
    return out, trainer


def test_ten_steps_raise_the_desirable_rewards_over_the_undesirable(online_run):
    _, trainer = online_run
    logs = step_logs(trainer)
    assert len(logs) == 10
    first, last = logs[0], logs[-1]
    assert first["rewards/margins"] == 0
    assert last["rewards/margins"] > first["rewards/margins"] + 0.5, last
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]
    assert last["logps/chosen"] > first["logps/chosen"] and last["logps/rejected"] < first["logps/rejected"]
    assert last["loss"] < first["loss"] - 0.05
    assert any(h["kl"] > 0 for h in logs)  # the reference point moves off 0 as the policy leaves the reference


def test_precomputed_reference_gives_the_live_references_losses(online_run, precomputed_run):
    online_out, online = online_run
    out, pre = precomputed_run
    assert pre.ref_cache.source == "computed" and pre.ref_cache.values.shape == (9, 2)
    assert list((out / "ref_log_probs").iterdir()) == [pre.ref_cache.path]
    assert online.ref_cache is None and not (online_out / "ref_log_probs").exists()
    online_logs, pre_logs = step_logs(online)[:5], step_logs(pre)
    assert len(pre_logs) == 5 and abs(online_logs[0]["loss"] - pre_logs[0]["loss"]) < 1e-6
    for key in ("loss", "kl", "rewards/margins"):
        a, b = [h[key] for h in online_logs], [h[key] for h in pre_logs]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (key, a, b)
    assert max(h["loss"] for h in pre_logs) - min(h["loss"] for h in pre_logs) > 1e-2  # the curve moves


def test_lora_reference_stays_the_starting_model_while_the_merger_trains(online_run, precomputed_run, tiny_model_dir):
    """After ten steps the live reference gives the reference log-probs of step 0 (the precomputed run's cache,
    filled before its first step) and the untouched base model's, for the answers and the KL answers."""
    from vlft.models.loading import load_model
    from vlft.train.preference.logprobs import completion_log_probs

    _, trainer = online_run
    _, pre = precomputed_run
    model = trainer.model.eval()
    base, _ = load_model(str(tiny_model_dir))
    base.eval()
    base_params = dict(base.named_parameters())
    merger = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()
              if ".visual.merger." in n}
    assert merger and all(not torch.equal(p, base_params[n]) for n, p in merger.items())  # it trained

    inputs = full_batch(trainer)
    plain = {k: v for k, v in inputs.items() if k not in ("label", "item_index")}
    with torch.no_grad():
        reference = trainer.reference_values(model, inputs)  # [answers; KL answers]
        start = pre.ref_cache.values[inputs["item_index"]].t().reshape(-1)
        expected = (lambda t, m: (t * m).sum(1))(*completion_log_probs(base, plain))
        policy = trainer.sequence_log_probs(*trainer.policy_log_probs(model, inputs))
        with model.disable_adapter():  # 2U1's reference: adapters off, but the merger as trained
            drifting = trainer.sequence_log_probs(*trainer.policy_log_probs(model, inputs))
    assert reference.shape == (18,)
    assert (reference - start).abs().max() < 1e-5
    assert (reference - expected).abs().max() < 1e-5
    # so that the comparisons could fail: the policy has moved, and so would a reference of adapters alone
    assert (policy - expected).abs().max() > 1e-2
    assert (drifting - expected).abs().max() > 1e-4
    live = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if ".visual.merger." in n}
    assert all(torch.equal(live[n], p) for n, p in merger.items())  # the reference pass put the merger back


# ------------------------------------------------------------------ 3. merge and predict
def test_the_run_merges_and_predicts_like_an_sft_run(online_run, tmp_path):
    from vlft.merge import main as merge_main
    from vlft.predict import main as predict_main

    out, _ = online_run
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors", "vlft_trained.json",
                 "vlft_args.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    args = json.loads((out / "vlft_args.json").read_text())
    assert args["loss_type"] == "kto" and args["desirable_weight"] == 1.0
    merged = tmp_path / "merged"
    assert merge_main(["--adapter", str(out), "--output", str(merged)]) == 0
    rows = {}
    for name, model in (("run", out), ("merged", merged)):
        path = tmp_path / f"{name}.jsonl"
        assert predict_main(["--model", str(model), "--data_path", str(KTO_DEMO), "--output", str(path),
                             "--max_new_tokens", "8"]) == 0
        rows[name] = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows["run"]) == 9
    assert [r["prediction"] for r in rows["run"]] == [r["prediction"] for r in rows["merged"]]
