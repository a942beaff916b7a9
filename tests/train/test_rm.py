"""`vlft rm` on the tiny model (CPU, fp32): the Bradley-Terry loss (margin, centring) equals its closed form and TRL
1.16's own `RewardTrainer.compute_loss` with its metrics; the margin column reaches the batch; training on pairs with a
learnable pattern reaches held-out accuracy 1 (LoRA, --eval_data_path); the saved run (full and LoRA) loads back
through the shared loader with the same rewards, also on the path GRPO scores through; blanking a record's picture
changes its reward; a resume restores the head; under a registered ZeRO-3 config the reward model loads whole; and
`vlft grpo --reward_funcs rm:<run>` logs the reward model's scores, per completion, and its pre-flight table shows
them."""
from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, REPO, demo_subset_file

from vlft.data.rm import PromptMedia, RewardCollator, parse_reward_record
from vlft.run_dir import NON_LORA_FILE, REWARD_HEAD_CONFIG, REWARD_HEAD_WEIGHTS, TRAINED_FILE
from vlft.train.rm.loss import bradley_terry_loss, reward_metrics
from vlft.train.rm.model import NOT_MODEL_INPUTS, load_reward_model, reward_forward
from vlft.train.rm.run import run

IMAGES = REPO / "data_examples" / "images"
DPO_DEMO = REPO / "data_examples" / "dpo_demo.json"
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
          "--log_line_steps", "0", "--freeze_vision_tower", "true"]
LORA = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16"]


# ------------------------------------------------------------------ the loss
def test_bradley_terry_loss_is_its_closed_form():
    chosen, rejected = [1.5, -0.25, 0.75], [0.5, 0.5, 2.0]
    margin, coef = [1.0, 0.0, -0.5], 0.01
    c, r, m = (torch.tensor(v, dtype=torch.float64) for v in (chosen, rejected, margin))

    def nll(d):  # -log sigmoid(d)
        return math.log1p(math.exp(-d))

    plain = sum(nll(a - b) for a, b in zip(chosen, rejected)) / 3
    with_margin = sum(nll(a - b - k) for a, b, k in zip(chosen, rejected, margin)) / 3
    centring = coef * sum((a + b) ** 2 for a, b in zip(chosen, rejected)) / 3
    assert bradley_terry_loss(c, r).item() == pytest.approx(plain, abs=1e-12)
    assert bradley_terry_loss(c, r, margin=m).item() == pytest.approx(with_margin, abs=1e-12)
    assert bradley_terry_loss(c, r, margin=m, center_rewards_coefficient=coef).item() == pytest.approx(
        with_margin + centring, abs=1e-12)
    assert bradley_terry_loss(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(math.log(2))  # untrained head



@pytest.mark.parametrize("family", FAMILIES)
def test_the_reward_is_transformers_sequence_classifier_on_the_same_model(family, tiny_model_factory):
    """The head through the LM head's place (`reward_forward`) against transformers' own rule for a reward model:
    `GenericForSequenceClassification` (score on the base model's last hidden state, read at the last non-pad token)
    over the same inner model and head weight, on the DPO demo's pairs (image, two images, video, history, text, an
    image-side pair); for Qwen3.5 transformers' own `Qwen3_5ForSequenceClassification`, the one VL classifier it has."""
    from transformers.modeling_layers import GenericForSequenceClassification

    from vlft.config import DataArguments
    from vlft.data.prepare import prepare_data
    from vlft.data.rm import build_collator, build_dataset, reward_format
    from vlft.models.loading import load_model, load_processor
    from vlft.train.rm.model import attach_reward_head

    path = str(tiny_model_factory(family))
    model, fam = load_model(path)
    processor = load_processor(path)
    media = DataArguments(video_min_pixels=1024, video_max_pixels=4096, fps=2).media_settings(fam)
    data = prepare_data(str(DPO_DEMO), reward_format(4096), processor=processor, image_folder=None, media=media,
                        max_seq_length=4096)
    dataset = build_dataset(data, processor, media=media)
    batch = build_collator(processor, model)([dataset[i] for i in range(len(dataset))])
    head = attach_reward_head(model, seed=3)
    model.eval()
    if family == "qwen3_5":
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForSequenceClassification as oracle_class
    else:
        pretrained = next(c for c in type(model).__mro__ if c.__name__.endswith("PreTrainedModel"))
        # defined as if in the family's modeling module (transformers reads its source for the MoE experts' kernels)
        oracle_class = type("RewardOracle", (GenericForSequenceClassification, pretrained),
                            {"__module__": pretrained.__module__})
    oracle = oracle_class(model.config)
    oracle.model = model.model  # the same inner model (vision tower, merger, language model): one set of weights
    oracle.config.get_text_config().pad_token_id = processor.tokenizer.pad_token_id
    with torch.no_grad():
        oracle.score.weight.copy_(head.weight)
        ours = reward_forward(model, model, batch)
        theirs = oracle.eval()(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}).logits[:, 0]
    assert ours.shape == (12,) and ours.std() > 1e-3
    assert (ours - theirs).abs().max().item() < 1e-5, (ours, theirs)


class _ScoresStub(torch.nn.Module):
    """A reward model that returns fixed scores [2B, 1] (TRL's RewardTrainer reads `outputs.logits`)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, **kwargs):
        return SimpleNamespace(logits=self.scores[:, None])


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.05])
def test_loss_and_metrics_equal_trls_reward_trainer(margin, coef):
    """TRL 1.16's `RewardTrainer.compute_loss` run on a stub (its own code, our fixed scores) is the oracle."""
    from trl import RewardTrainer

    scores = torch.tensor([2.0, -1.0, 0.5, 0.25, 0.5, -3.0, 1.0, 0.25], dtype=torch.float64)  # [chosen; rejected]
    margins = torch.tensor([0.5, 0.0, 1.5, -0.5], dtype=torch.float64)
    inputs = {"input_ids": torch.ones(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = margins
    accelerator = SimpleNamespace(gather_for_metrics=lambda t: t, gather=lambda t: t)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=coef),
                           accelerator=accelerator, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)
    expected = RewardTrainer.compute_loss(stub, _ScoresStub(scores), dict(inputs))
    chosen, rejected = scores.chunk(2)
    ours = bradley_terry_loss(chosen, rejected, margin=margins if margin else None, center_rewards_coefficient=coef)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-12)
    trl_metrics = {k: v[0] for k, v in stub._metrics["train"].items() if k != "num_tokens"}
    ours = {k: v.item() for k, v in reward_metrics(chosen, rejected).items()}
    assert ours.keys() == trl_metrics.keys()
    for key, value in trl_metrics.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


# ------------------------------------------------------------------ the data
def test_margin_is_parsed_checked_and_batched():
    record = {"id": "a", "prompt": "Which?", "chosen": "This.", "rejected": "That."}
    sample, problems = parse_reward_record({**record, "margin": 2}, 3, "pairs.json")
    assert problems == [] and sample.margin == 2.0 and sample.chosen == "This."
    assert parse_reward_record(record, 3, "pairs.json")[0].margin == 0.0  # absent: the plain loss
    for bad in ("2", True, float("nan")):
        sample, problems = parse_reward_record({**record, "margin": bad}, 3, "pairs.json")
        assert sample is None and [(p.index, p.field, p.record_id) for p in problems] == [(3, "margin", "a")]
        assert "not a finite number" in problems[0].message

    class Rows:  # the SFT collator's part is not what this checks
        def __call__(self, rows):
            return {"input_ids": torch.stack([r["input_ids"] for r in rows])}

    ids = torch.tensor([1, 2])
    pair = {"pair_index": 0, "prompt_ids": ids, "chosen_ids": ids, "chosen_mask": ids, "rejected_ids": ids,
            "rejected_mask": ids}
    batch = RewardCollator(Rows())([{**pair, "margin": 1.5}, {**pair, "pair_index": 1, "margin": 0.0}])
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["input_ids"].shape[0] == 4



def test_check_data_and_preview_read_the_rm_stage(tiny_model_dir, tmp_path, capsys):
    """The STAGES row: `vlft check-data --stage rm` checks the margin (naming the record and the field), and
    `vlft preview --stage rm` shows each pair's prompt, chosen and rejected tokens."""
    from vlft.cli import main

    demo = REPO / "data_examples" / "dpo_demo.json"
    records = json.loads(demo.read_text())
    records[0]["margin"], records[1]["margin"] = 1.5, "big"
    bad = tmp_path / "pairs.json"
    bad.write_text(json.dumps(records))
    common = ["--stage", "rm", "--model_id", str(tiny_model_dir), "--image_folder", str(demo.parent)]
    assert main(["check-data", *common, "--data_path", str(demo)]) == 0
    assert "rm data: 6 of 6 records usable" in capsys.readouterr().err
    assert main(["check-data", *common, "--data_path", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "record 1 (id 'multi_image')" in err and "margin" in err and "not a finite number" in err
    page = tmp_path / "preview.html"
    assert main(["preview", *common, "--data_path", str(demo), "--output", str(page)]) == 0
    html = page.read_text()
    assert html.count('data-trained=') >= 12 and "rejected (" in html and "chosen (" in html


# ------------------------------------------------------------------ training
def _pairs(names, questions):
    """One pair per (picture, question): the answers differ by the pattern to learn, "Yes." over "No."."""
    return [{"id": f"{name.split('.')[0]}-{k}", "image": str(IMAGES / name),
             "conversations": [{"from": "human", "value": f"<image>\n{question}"}],
             "chosen": "Yes.", "rejected": "No."} for k, question in enumerate(questions) for name in names]


@pytest.fixture(scope="module")
def pattern_data(tmp_path_factory):
    """16 training pairs and 4 held-out ones: other pictures, other questions, the same pattern."""
    folder = tmp_path_factory.mktemp("rm_data")
    train = _pairs(["red_square.png", "green_circle.png", "count_1.png", "count_2.png"],
                   ["Is there a shape?", "Can you see it?", "Is it coloured?", "Is this a picture?"])
    held = _pairs(["count_3.png", "cat_sketch.png"], ["Is it drawn?", "Is something there?"])
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "held.json").write_text(json.dumps(held))
    return folder / "train.json", folder / "held.json"


@pytest.fixture(scope="module")
def lora_rm(tiny_model_dir, pattern_data, tmp_path_factory):
    """LoRA + head, 4 epochs of 2 steps, evaluated on the held-out pairs every step, a checkpoint at step 4."""
    train, held = pattern_data
    out = tmp_path_factory.mktemp("runs") / "rm_lora"
    flags = [*LORA, "--per_device_train_batch_size", "8", "--num_train_epochs", "4", "--learning_rate", "2e-3",
             "--lr_scheduler_type", "constant", "--eval_data_path", str(held), "--eval_steps", "1",
             "--save_steps", "4", *COMMON]
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--data_path", str(train), "--output_dir", str(out),
                            *flags])
    return SimpleNamespace(out=out, trainer=trainer, flags=flags, data=train)


@pytest.fixture(scope="module")
def full_rm(tiny_model_dir, pattern_data, tmp_path_factory):
    """Full fine-tuning (the tower frozen), one step on all six DPO demo pairs (image, two images, video, history,
    text, an image-side pair), evaluated on the held-out pattern pairs."""
    _, held = pattern_data
    out = tmp_path_factory.mktemp("runs") / "rm_full"
    _, trainer = run(["--model_id", str(tiny_model_dir), "--data_path", str(DPO_DEMO), "--output_dir", str(out),
                      "--per_device_train_batch_size", "6", "--max_steps", "1", "--learning_rate", "1e-3",
                      "--eval_data_path", str(held), "--save_strategy", "no", "--video_min_pixels", "1024",
                      "--video_max_pixels", "4096", "--fps", "2", *COMMON])
    return SimpleNamespace(out=out, trainer=trainer)


def test_training_on_a_pattern_reaches_held_out_accuracy_1(lora_rm):
    history = lora_rm.trainer.state.log_history
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert len(train) == 8 and len(evals) == 8
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):  # TRL's names, train and eval
        assert all(key in h for h in train) and all(f"eval_{key}" in h for h in evals), key
    assert evals[-1]["eval_accuracy"] == 1.0
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"] > 0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert train[-1]["loss"] < 0.1 < train[0]["loss"]
    first = train[0]
    assert first["min_reward"] <= first["mean_reward"] <= first["max_reward"]


def test_run_directory_is_an_sft_run_plus_the_head(lora_rm):
    from safetensors.torch import load_file

    for folder in (lora_rm.out, lora_rm.out / "checkpoint-4"):
        assert (folder / REWARD_HEAD_WEIGHTS).is_file(), folder
        record = json.loads((folder / REWARD_HEAD_CONFIG).read_text())
        assert record["pooling"] == "last_non_pad_token" and record["hidden_size"] == 64
        trained = json.loads((folder / TRAINED_FILE).read_text())["non_lora"]
        assert trained and not any("score" in name for name in trained)  # the merger: the head is apart
        assert not any("score" in name for name in load_file(str(folder / NON_LORA_FILE)))
    head = load_file(str(lora_rm.out / REWARD_HEAD_WEIGHTS))["weight"]
    owner = lora_rm.trainer.head_owner
    assert torch.equal(head, owner.score.weight.detach().float().cpu())


def _eval_batch(trainer):
    """The held-out pairs as the trainer feeds them to the model ([chosen; rejected] rows, pixels normalised)."""
    dataset = trainer.eval_dataset
    return dataset, trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_saved_reward_model_loads_back_with_the_same_rewards(kind, lora_rm, full_rm):
    trained = lora_rm if kind == "lora" else full_rm
    trainer = trained.trainer
    dataset, batch = _eval_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        expected = reward_forward(trainer.model, trainer.head_owner, batch)
    rm = load_reward_model(trained.out)
    assert not any("lora_" in n for n, _ in rm.named_parameters())  # the shared loader merged the adapter
    got = rm(**batch)
    assert got.shape == expected.shape == (2 * len(dataset),)
    assert (got - expected).abs().max().item() < 1e-5, (got, expected)
    assert expected.std() > 1e-3  # rewards that differ, not one constant
    # GRPO's path: each chosen answer after its own prompt and picture, encoded by the reward model's processor
    prompts = [PromptMedia(s.messages, dataset.image_paths[i], dataset.video_sources[i], key=i)
               for i, s in enumerate(dataset.samples)]
    scored = rm.score(prompts, [s.completions[0] for s in dataset.samples], batch_size=3)
    assert (scored - expected[:len(dataset)]).abs().max().item() < 1e-5


def test_a_merged_lora_reward_model_carries_its_head_and_scores_the_same(lora_rm, tmp_path):
    """`vlft merge` of a LoRA RM run copies the head files next to the merged weights: the merged folder loads as
    the same reward model."""
    from vlft.merge import merge

    trainer = lora_rm.trainer
    _, batch = _eval_batch(trainer)
    expected = load_reward_model(lora_rm.out)(**batch)
    merged = merge(str(lora_rm.out), str(tmp_path / "merged"), dtype="fp32")
    assert (merged / "reward_head.safetensors").is_file() and (merged / "reward_head.json").is_file()
    got = load_reward_model(merged)(**batch)
    assert (got - expected).abs().max().item() < 1e-5


def test_encoding_each_picture_once_gives_the_same_rewards(full_rm):
    """The demo pairs in one batch (a rejected row showing the prompt's picture reuses its features; the image-side
    pair's rejected picture is its own): the same rewards as every row encoding its pictures."""
    trainer = full_rm.trainer
    dataset = trainer.train_dataset
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    copies = batch["image_copy_of"].tolist()
    assert batch["video_grid_thw"].shape[0] == 2 and len(set(copies)) < len(copies)
    trainer.model.eval()
    with torch.no_grad():
        once = reward_forward(trainer.model, trainer.head_owner, batch, vision_once=True)
        every = reward_forward(trainer.model, trainer.head_owner, batch)
    assert (once - every).abs().max().item() < 1e-5 and every.std() > 1e-3


def test_blanking_a_records_picture_changes_its_reward(lora_rm, tmp_path):
    from PIL import Image

    rm = load_reward_model(lora_rm.out)
    picture = IMAGES / "count_3.png"
    blank = tmp_path / "blank.png"
    Image.new("RGB", Image.open(picture).size, (255, 255, 255)).save(blank)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it drawn?"}]}]
    answer = {"content": "Yes."}
    shown, again, blanked = rm.score([PromptMedia(messages, [str(picture)], [], key=0),
                                      PromptMedia(messages, [str(picture)], [], key=1),
                                      PromptMedia(messages, [str(blank)], [], key=2)], [answer] * 3).tolist()
    assert abs(shown - again) < 1e-5  # the same picture: the same reward (up to the batch's rounding)
    assert abs(shown - blanked) > 1e-3, (shown, again, blanked)


def test_a_resume_restores_the_head(lora_rm, tiny_model_dir, tmp_path):
    """Steps 5-8 again from checkpoint-4 (in a copy of the run): the head and the adapter end as the straight run's
    (a fresh head drawn at start-up and kept would not)."""
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    shutil.copytree(lora_rm.out, out)
    run(["--model_id", str(tiny_model_dir), "--data_path", str(lora_rm.data), "--output_dir", str(out),
         *lora_rm.flags, "--resume_from_checkpoint", str(out / "checkpoint-4")])
    for name in (REWARD_HEAD_WEIGHTS, "adapter_model.safetensors"):
        straight, resumed = load_file(str(lora_rm.out / name)), load_file(str(out / name))
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.allclose(straight[key], resumed[key], atol=1e-6), (name, key)


def test_the_reward_model_loads_whole_under_a_registered_zero3_config(lora_rm):
    """A ZeRO-3 run registers its config with transformers (TrainingArguments); the reward model beside the policy
    must still load as a plain module (without `loading_whole`, from_pretrained would partition it with zero.Init)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    plain = load_reward_model(lora_rm.out)
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        rm = load_reward_model(lora_rm.out)
        assert is_deepspeed_zero3_enabled()  # registered again for the policy
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del config
    assert not any(hasattr(p, "ds_id") for p in rm.parameters())
    for (name, p), (_, q) in zip(rm.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------ GRPO with the reward model
def test_grpo_logs_the_reward_models_scores(lora_rm, tiny_model_dir, tmp_path_factory, capfd):
    """`vlft grpo --reward_funcs rm:<run> format` on the demo prompts (image, two images, video, text): the pre-flight
    table's rm column and every completion's rm reward are the reward model's own scores of that completion after its
    prompt and media, and the step logs them under rewards/rm/."""
    from vlft.cli import main as cli_main
    from vlft.train.grpo.rewards import completion_message

    demo = REPO / "data_examples" / "grpo_demo.json"
    ids = ("count_1", "count_5_two_images", "video", "text_only")
    data = demo_subset_file(demo, ids, tmp_path_factory.mktemp("data") / "prompts.json")
    out = tmp_path_factory.mktemp("runs") / "grpo_rm"
    assert cli_main(["grpo", "--model_id", str(tiny_model_dir), "--data_path", data, "--output_dir", str(out),
                     "--reward_funcs", f"rm:{lora_rm.out}", "format", *LORA, "--per_device_train_batch_size", "4",
                     "--num_generations", "2", "--max_steps", "1", "--max_completion_length", "8",
                     "--video_min_pixels", "1024", "--video_max_pixels", "4096", "--fps", "2",
                     "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0"]) == 0
    err = capfd.readouterr().err
    rm = load_reward_model(lora_rm.out)
    records = {r["id"]: r for r in json.loads(open(data).read())}

    def prompt_of(record_id):
        from vlft.data.grpo import parse_prompt_record

        record = records[record_id]
        sample = parse_prompt_record(record, 0, data)[0]
        images = record.get("image", [])
        videos = [record["video"]] if "video" in record else []
        return PromptMedia(sample.messages, images if isinstance(images, list) else [images], videos)

    # the pre-flight table: one row per record, the rm column is the model's score of the sample completion
    table = err[err.index("reward check on"):].splitlines()
    header = table[1].split()
    assert header[-3:] == ["rm", "format", "total"]
    rows = [line.split() for line in table[2:2 + len(ids)]]
    # the table cuts ids to 16 characters ("count_5_two_i...")
    shown = {next(i for i in ids if i == row[1] or i.startswith(row[1].removesuffix("..."))):
             row[header.index("rm") - len(header)] for row in rows}
    assert set(shown) == set(ids)
    for record_id, value in shown.items():
        answer = records[record_id].get("solution", "an answer")
        sample_completion = f"<think>Looking at the input.</think>\n<answer>{answer}</answer>"
        score = rm.score([prompt_of(record_id)], [completion_message(sample_completion)]).item()
        assert value == f"{score:.4g}", (record_id, value, score)
    # the step: every completion's rm reward, and the logged statistics
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 4
    scores = rm.score([prompt_of(row["id"]) for row in completions],
                      [completion_message(row["completion"]) for row in completions])
    logged = torch.tensor([row["rewards"]["rm"] for row in completions])
    assert (logged - scores).abs().max().item() < 1e-4, (logged, scores)
    state = json.loads((out / "trainer_state.json").read_text())["log_history"][0]
    assert state["rewards/rm/mean"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert "rewards/rm/std" in state and "rewards/format/mean" in state


# ------------------------------------------------------------------ the script
@pytest.mark.parametrize("demo", [True, False], ids=["demo", "real-model"])
def test_rm_script_flags_are_rm_arguments_and_parse(tmp_path, demo):
    import dataclasses

    from test_scripts import SCRIPTS, TINY, WORKERS, flat, launched_argv, script_flags

    from vlft.config import parse_args, validate
    from vlft.train.rm.config import GROUPS

    text = (SCRIPTS / "finetune_rm.sh").read_text()
    assert "vlft_launch rm" in text
    assert sorted(script_flags(text) - {f.name for g in GROUPS for f in dataclasses.fields(g) if f.init}) == []
    pairs = tmp_path / "pairs.json"
    pairs.write_text("[]")
    settings = {} if demo else {"MODEL": "/ckpt/sft", "DATA": str(pairs), "EVAL_DATA": str(pairs),
                                "CENTER_REWARDS_COEFFICIENT": "0.01"}
    calls = launched_argv(tmp_path, "finetune_rm.sh", **settings)
    assert sorted(calls) == (["rm", "tiny-model"] if demo else ["rm"])
    groups = parse_args(GROUPS, calls["rm"])
    validate(*groups)
    values = flat(groups)
    if demo:
        assert values["model_id"] == str(tmp_path / "cache" / TINY)
        assert values["data_path"] == [str(REPO / "data_examples" / "dpo_demo.json")]
        expected = dict(num_train_epochs=6, learning_rate=5e-3, lora_rank=16, center_rewards_coefficient=None,
                        eval_data_path=None, dataloader_num_workers=0)
    else:
        expected = dict(model_id="/ckpt/sft", data_path=[str(pairs)], num_train_epochs=1, learning_rate=1e-4,
                        lora_rank=64, center_rewards_coefficient=0.01, eval_data_path=str(pairs),
                        gradient_accumulation_steps=16, dataloader_num_workers=WORKERS)
    expected.update(lora_enable=True, freeze_vision_tower=True, freeze_merger=False, packing=False,
                    per_device_train_batch_size=2, output_dir=str(tmp_path / "out"))
    assert {k: values[k] for k in expected} == expected
