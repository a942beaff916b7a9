"""`vlft grpo` end to end on the tiny models (CPU, fp32): the media of every prompt reach the policy in the
generation pass and in the log-prob pass (a hook on the vision tower, pixel for pixel), and blanking one picture
moves the log-probs of its own prompt's completions only; the log-probs of the sampled tokens taken from the
sampling logits equal the trainer's recomputed ones (image, two-image, video and text prompts in one batch, every
family, the new ones too), and sampling covers the whole vocabulary; with the Qwen3_5Tokenizer a completion ends at
<|im_end|> and never holds a vision token; reward functions get each record's columns by name, per
completion, in the order of the completions (also in a step none of whose prompts has the column), completions.jsonl
holds each completion's reasoning and answer (a Qwen3.5 thinking prompt's unfinished reasoning: an empty answer), and
a wrong reward stops the run before the model loads; a reward the tiny model can earn rises within 30 steps; with
--beta > 0 the KL is logged and is 0 at step 1 (LoRA and full fine-tuning)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, REPO, demo_subset_file

from vlft.data.grpo import training_rows
from vlft.errors import VlftError
from vlft.train.grpo.rewards import split_completion
from vlft.train.grpo.run import run
from vlft.train.preference.logprobs import completion_log_probs

GRPO_DEMO = REPO / "data_examples" / "grpo_demo.json"
MIXED = ("count_1", "count_5_two_images", "video", "text_only")  # image, two images, video, text
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
          "--save_strategy", "no"]
LORA = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0"]
# small frames; 8 frames a second of the 2 s demo video: 16 frames, 8 temporal patches of 0.25 s (Qwen2.5-VL's
# mRoPE time positions then differ from the patch index)
VIDEO = ["--video_min_pixels", "1024", "--video_max_pixels", "4096", "--video_max_total_pixels", "65536",
         "--fps", "8"]
G = 2  # completions per prompt in the mixed runs
TEMPERATURE = 0.7
TEXT_PROMPTS = ["What is two plus two?", "Name a primary colour.", "What is the capital of France?",
                "Tell me a fact."]


def demo_subset(tmp_path_factory, ids) -> str:
    """The GRPO demo records with these ids, in this order, media paths made absolute, in a new file."""
    return demo_subset_file(GRPO_DEMO, ids, tmp_path_factory.mktemp("data") / "prompts.json")


def write_json(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def grpo(model_dir, out, data, *flags):
    return run(["--model_id", str(model_dir), "--data_path", str(data), "--output_dir", str(out), *flags])


# ------------------------------------------------------------------ the mixed batch: 1 and 2
@pytest.fixture(scope="module")
def mixed_runs(tiny_model_factory, tmp_path_factory):
    """family -> trainer after one step on the four mixed prompts (one batch: 4 prompts x 2 completions), LoRA
    without dropout; built on first use."""
    runs = {}

    def get(family):
        if family not in runs:
            data = demo_subset(tmp_path_factory, MIXED)
            out = tmp_path_factory.mktemp("runs") / f"mixed-{family}"
            _, runs[family] = grpo(tiny_model_factory(family), out, data, *LORA, "--max_steps", "1",
                                   "--per_device_train_batch_size", str(4 * G), "--num_generations", str(G),
                                   "--max_completion_length", "8", "--temperature", str(TEMPERATURE),
                                   "--reward_funcs", "count", *VIDEO, *COMMON)
        return runs[family]

    return get


def mixed_items(trainer) -> list[dict]:
    dataset = trainer.train_dataset
    items = [dataset[i] for i in range(len(dataset))]
    assert [trainer.samples[i["record"]].id for i in items] == list(MIXED)
    assert ["pixel_values" in i for i in items] == [True, True, False, False]
    assert ["pixel_values_videos" in i for i in items] == [False, False, True, False]
    assert len(items[1]["image_grid_thw"]) == 2
    assert items[2]["video_grid_thw"][0, 0] == 8 and list(items[2]["second_per_grid_ts"]) == [0.25]  # see VIDEO
    return items


def expected_media(trainer, items) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kind -> (the float pixel rows the tower must see, their grids): each prompt's pictures, G times, in batch
    order."""
    image_norm, video_norm = trainer.pixel_norms
    out = {}
    for kind, pixels_key, grid_key, norm in (("image", "pixel_values", "image_grid_thw", image_norm),
                                             ("video", "pixel_values_videos", "video_grid_thw", video_norm)):
        holders = [it for it in items if pixels_key in it]
        out[kind] = (torch.cat([norm(it[pixels_key]) for it in holders for _ in range(G)]),
                     torch.cat([it[grid_key] for it in holders for _ in range(G)]))
    return out


class TowerCalls:
    """A forward hook on the vision tower of the bare model under PEFT: the pixel rows and grids of every call."""

    def __init__(self, trainer):
        self.visual = trainer.model.get_base_model().model.visual
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(self, module, args, kwargs, output):
        pixels = args[0] if args else kwargs["hidden_states"]
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.calls.append((pixels.detach().clone(), grid.detach().clone()))

    def __enter__(self):
        self.handle = self.visual.register_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        calls, self.calls = self.calls, []
        return calls


def assert_every_picture_once_per_completion(calls, expected, items) -> None:
    """One tower call for the images and one for the videos, each with exactly the expected rows and grids."""
    assert len(calls) == 2, [tuple(grid.shape) for _, grid in calls]
    for kind, (pixels, grid) in expected.items():
        holders = [it for it in items if f"{kind}_grid_thw" in it]
        rows = G * sum(int(it[f"{kind}_grid_thw"].prod(-1).sum()) for it in holders)  # from the items' grids
        (got_pixels, got_grid), = [(p, g) for p, g in calls if g.shape == grid.shape and torch.equal(g, grid)]
        assert got_pixels.shape[0] == rows == pixels.shape[0], (kind, got_pixels.shape, rows)
        torch.testing.assert_close(got_pixels, pixels.to(got_pixels.dtype), rtol=0, atol=0)


# the new families on the mixed batch: Qwen3.5's hybrid decoder (left-padded generation through its linear
# attention) and its Qwen3_5Tokenizer, and the MoE decoders
WITH_NEW = FAMILIES + ("qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")


@pytest.mark.parametrize("family", WITH_NEW)
def test_every_picture_reaches_the_tower_in_generation_and_log_prob_passes(mixed_runs, family):
    trainer = mixed_runs(family)
    items = mixed_items(trainer)
    expected = expected_media(trainer, items)
    trainer.model.train()  # as in training_step
    with TowerCalls(trainer) as tower:
        batch = trainer.rollout(items)  # the generation pass (no reference: --beta 0)
        generation = tower.take()
        loss = trainer.compute_loss(trainer.model, batch)  # the log-prob pass of the loss
        log_prob = tower.take()
    assert torch.isfinite(loss)
    assert_every_picture_once_per_completion(generation, expected, items)
    assert_every_picture_once_per_completion(log_prob, expected, items)


@pytest.mark.parametrize("blank", ["image", "second_of_two_images", "video"])
def test_blanking_a_picture_moves_only_its_prompts_log_probs(mixed_runs, blank):
    trainer = mixed_runs("qwen2_vl")
    items = mixed_items(trainer)
    completions, masks, _, _ = trainer.generate(items)

    def log_probs(prompt_items) -> torch.Tensor:
        batch = trainer._prepare_inputs(trainer.training_collator(training_rows(prompt_items, G, completions, masks)))
        with torch.no_grad():
            per_token, _ = completion_log_probs(trainer.model, batch, temperature=TEMPERATURE)
        return per_token

    blanked = [dict(it) for it in items]
    if blank == "image":
        prompt = 0
        blanked[0]["pixel_values"] = torch.zeros_like(items[0]["pixel_values"])
    elif blank == "second_of_two_images":
        prompt = 1
        first_rows = int(items[1]["image_grid_thw"][0].prod())
        pixels = items[1]["pixel_values"].clone()
        pixels[first_rows:] = 0
        blanked[1]["pixel_values"] = pixels
    else:
        prompt = 2
        blanked[2]["pixel_values_videos"] = torch.zeros_like(items[2]["pixel_values_videos"])
    trainer.model.eval()
    change = (log_probs(blanked) - log_probs(items)).abs().amax(-1)  # per completion row
    rows = torch.arange(len(change)) // G == prompt
    print(f"\nblank {blank}: max |change| of its completions {change[rows].tolist()}, others {change[~rows].max():.1e}")
    assert change[rows].min() > 1e-4, change
    assert change[~rows].max() < 1e-6, change


@pytest.fixture(scope="module")
def mixed_rollouts(mixed_runs):
    """family -> (trainer, the rollout's training batch, last_rollout) of one rollout that kept its logits."""
    done = {}

    def get(family):
        if family not in done:
            trainer = mixed_runs(family)
            trainer.model.train()
            trainer.keep_generation_logits = True
            try:
                batch = trainer.rollout(mixed_items(trainer))
            finally:
                trainer.keep_generation_logits = False
            done[family] = trainer, batch, trainer.last_rollout
        return done[family]

    return get


@pytest.mark.parametrize("family", WITH_NEW)
def test_sampling_log_probs_equal_the_recomputed_ones(mixed_rollouts, family):
    trainer, batch, rollout = mixed_rollouts(family)
    sequences, logits = rollout["sequences"], rollout["logits"]
    assert sequences.shape[0] == logits.shape[0] == 4 * G and logits.shape[1] == sequences.shape[1]
    # the training rows hold the generation batch's media
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if key in rollout["batch"]:
            assert torch.equal(rollout["batch"][key], batch[key]), key
    with torch.no_grad():
        per_token, mask = completion_log_probs(trainer.model, batch, temperature=TEMPERATURE)
    worst = 0.0
    for i in range(sequences.shape[0]):
        row = sequences[i].tolist()
        ends = [k for k, t in enumerate(row) if t in trainer.end_ids]
        n = ends[0] + 1 if ends else len(row)  # up to and with the first end-of-turn token
        assert int(mask[i].sum()) == n, (i, row)
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == row[:n]  # the training row scores the sampled tokens
        sampled = torch.log_softmax(logits[i, :n].float() / TEMPERATURE, -1).gather(-1, sequences[i, :n, None])[:, 0]
        worst = max(worst, (per_token[i][mask[i].bool()] - sampled).abs().max().item())
    print(f"\n{family}: max |sampling - recomputed| log-prob {worst:.2e} over {int(mask.sum())} tokens")
    assert worst < 1e-4


def test_generation_ends_at_im_end_and_never_writes_vision_tokens_with_the_qwen3_5_tokenizer(mixed_rollouts):
    """The stop and suppressed ids are the Qwen3_5Tokenizer's own: <|im_end|> ends a completion (and is kept in it),
    and the vision ids the model's config names are never sampled."""
    trainer, batch, rollout = mixed_rollouts("qwen3_5")
    tok = trainer.encoder.tokenizer
    assert type(tok).__name__ == "Qwen3_5Tokenizer"
    config = trainer.model.get_base_model().config
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trainer.end_ids[0] == im_end == config.text_config.eos_token_id
    assert im_end in trainer.generation_config.eos_token_id
    vision = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    assert vision <= set(trainer.generation_config.suppress_tokens)
    assert not vision & set(rollout["sequences"].flatten().tolist())
    # the tiny model rarely samples <|im_end|> within 8 tokens: bias it so that every completion ends early
    config = trainer.generation_config
    trainer.generation_config = copy.deepcopy(config)
    trainer.generation_config.sequence_bias = {(im_end,): 30.0}
    try:
        completions, masks, truncated, _ = trainer.generate(mixed_items(trainer))
    finally:
        trainer.generation_config = config
    assert not any(truncated)
    for ids, mask in zip(completions, masks):  # cut after the first <|im_end|>, which is kept and learned
        assert ids[-1] == im_end and im_end not in ids[:-1].tolist() and mask.tolist() == [1] * len(ids)


def test_special_token_lookup_leaves_out_what_the_tokenizer_lacks():
    """Qwen3_5Tokenizer's unk token defaults to <|endoftext|>, so `convert_tokens_to_ids` answers that real token's
    id for a missing one: the lookup GRPO and predict use for their stop and suppressed ids leaves it out instead."""
    from transformers import Qwen3_5Tokenizer

    from vlft.data.encoding import special_token_ids

    tok = Qwen3_5Tokenizer(vocab={"a": 0, "b": 1}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]})
    endoftext, im_end, image_pad = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"])
    assert tok.convert_tokens_to_ids("<|video_pad|>") == endoftext  # the trap
    assert special_token_ids(tok, ("<|im_end|>", "<|endoftext|>")) == [im_end, endoftext]
    assert special_token_ids(tok, ("<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")) == [image_pad]


def test_sampling_uses_the_whole_vocabulary(mixed_rollouts):
    """--top_k 0 (the default) is no top-k, as in TRL: the recomputed log-probs are those of the full softmax,
    so tokens outside the 50 likeliest must be drawn too (transformers' own default would cut at 50)."""
    trainer, _, rollout = mixed_rollouts("qwen2_vl")
    sequences, logits = rollout["sequences"], rollout["logits"]
    ranks = (logits > logits.gather(-1, sequences[..., None])).sum(-1)  # 0 = the likeliest token
    ranks = ranks[sequences != trainer.encoder.tokenizer.pad_token_id]
    assert ranks.max() >= 50, ranks.tolist()
    assert trainer.generation_config.top_k == 0
    suppressed = set(trainer.generation_config.suppress_tokens)
    assert suppressed and not suppressed & set(sequences.flatten().tolist())  # no vision placeholder sampled


# ------------------------------------------------------------------ 3. reward plumbing
SPY = '''
import json

LOG = {log!r}


def spy(prompts, completions, completion_ids, solution, choices, bbox, id, trainer_state, **kwargs):
    with open(LOG, "a") as fh:
        fh.write(json.dumps({{"max_steps": trainer_state.max_steps, "prompts": prompts, "completions": completions,
                             "completion_ids": completion_ids, "id": id, "solution": solution, "choices": choices,
                             "bbox": bbox}}) + "\\n")
    return [float(k) for k in range(len(completions))]  # its position: the logged rewards show the order
'''
# 6 text prompts; `choices` only in the last two (past the 4 the pre-flight takes by default) and `bbox` in one:
# whichever way one epoch pairs them (2 prompts a step), some step has no prompt with `choices`
PLUMBING = [
    {"id": "r0", "prompt": "What is two plus two?", "solution": "4"},
    {"id": "r1", "conversations": [{"from": "human", "value": "Name a primary colour."},
                                   {"from": "gpt", "value": "Red."}]},  # 2U1's layout: the answer is the solution
    {"id": "r2", "prompt": "What is the capital of France?", "solution": "Paris", "bbox": [1, 2, 30, 40]},
    {"id": "r3", "prompt": "Tell me a fact.", "solution": "Water boils at one hundred degrees."},
    {"id": "r4", "prompt": "Which one is larger?", "solution": "B", "choices": ["the cat", "the dog"]},
    {"id": "r5", "prompt": "Which way does it point?", "solution": "A", "choices": ["up", "down", "left"]},
]
QUESTIONS = {"r0": "two plus two", "r1": "primary colour", "r2": "capital of France", "r3": "Tell me a fact",
             "r4": "Which one is larger", "r5": "Which way does it point"}


@pytest.fixture(scope="module")
def plumbing_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plumbing")
    log = tmp / "calls.jsonl"
    (tmp / "spy.py").write_text(SPY.format(log=str(log)))
    data = write_json(tmp / "prompts.json", PLUMBING)
    out = tmp / "out"
    _, trainer = grpo(tiny_model_dir, out, data, *LORA, "--max_steps", "3", "--per_device_train_batch_size", "6",
                      "--num_generations", "3", "--max_completion_length", "4",
                      "--reward_funcs", f"{tmp / 'spy.py'}:spy", "count", *COMMON)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return trainer, calls, out


def test_reward_columns_arrive_per_completion_in_order(plumbing_run):
    trainer, calls, out = plumbing_run
    g = 3
    records = {r["id"]: r for r in PLUMBING}
    solutions = {**{i: r.get("solution") for i, r in records.items()}, "r1": "Red."}
    preflight, training = calls[0], calls[1:]
    assert preflight["max_steps"] == 0  # the start-up check ran on real records, with every column
    assert any(c is not None for c in preflight["choices"]) and any(b is not None for b in preflight["bbox"])
    assert len(training) == 3 and all(c["max_steps"] == 3 for c in training)

    seen = []
    for call in training:
        n = len(call["completions"])
        assert n == 2 * g
        for key in ("prompts", "completion_ids", "id", "solution", "choices", "bbox"):
            assert len(call[key]) == n, key
        for k in range(n):
            rid = call["id"][k]
            assert rid == call["id"][k - k % g]  # each prompt's G completions together
            record = records[rid]
            assert call["solution"][k] == solutions[rid]
            assert call["choices"][k] == record.get("choices")  # None where the record has none
            assert call["bbox"][k] == record.get("bbox")
            assert QUESTIONS[rid] in call["prompts"][k]
            assert trainer.encoder.tokenizer.decode(call["completion_ids"][k], skip_special_tokens=True) == \
                call["completions"][k]
        seen += call["id"][::g]
    assert sorted(seen) == sorted(records)  # one epoch: every prompt once
    assert any(all(c is None for c in call["choices"]) for call in training)  # a step without the column

    # completions.jsonl: the same completions in the same order, each with the reward the spy gave its position
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3) for _ in range(2 * g)]
    for step, call in enumerate(training, start=1):
        logged = [r for r in rows if r["step"] == step]
        assert [(r["id"], r["completion"]) for r in logged] == list(zip(call["id"], call["completions"]))
        assert [r["rewards"]["spy"] for r in logged] == [float(k) for k in range(2 * g)]
        # the reasoning and the answer apart, as the rewards read them against the prompt (tiny models: no tags)
        assert [(r["reasoning"], r["answer"]) for r in logged] == [
            split_completion(c, p) for c, p in zip(call["completions"], call["prompts"])]
        assert all(r["images"] == [] and r["videos"] == [] for r in logged)
    assert all(h["rewards/spy/mean"] == pytest.approx((2 * g - 1) / 2) for h in step_logs(trainer))


def test_a_reward_of_the_wrong_length_stops_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "bad.py").write_text("def short(completions, **kwargs):\n    return [1.0] * (len(completions) - 1)\n")
    data = write_json(tmp_path / "prompts.json", PLUMBING)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the reward check")

    monkeypatch.setattr("vlft.train.core.setup.prepare_model", no_model)
    out = tmp_path / "out"
    with pytest.raises(VlftError, match=r"reward 'short' returned (\d+) value\(s\) for (\d+) completions; "
                                        r"expected length \2, got \1"):
        grpo(tiny_model_dir, out, data, "--reward_funcs", "format", f"{tmp_path / 'bad.py'}:short", *COMMON)
    assert not out.exists()


def test_a_reward_needing_a_missing_column_names_it_and_the_columns(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "box.py").write_text("def box_reward(completions, box, **kwargs):\n    return [0.0] * len(box)\n")
    data = write_json(tmp_path / "prompts.json", PLUMBING)
    monkeypatch.setattr("vlft.train.core.setup.prepare_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    with pytest.raises(VlftError) as info:
        grpo(tiny_model_dir, out, data, "--reward_funcs", f"{tmp_path / 'box.py'}:box_reward", *COMMON)
    message = str(info.value)
    assert "reward 'box_reward' needs the argument 'box', which is no column of the data" in message
    have = message.split("the records have the columns:")[1].split("->")[0]
    assert {c.strip() for c in have.split(",")} >= {"id", "solution", "bbox", "choices"}, message
    assert not out.exists()


# ------------------------------------------------------------------ 4. it learns
FIRST_TOKEN = '''
def first_token(completion_ids, **kwargs):
    return [float(bool(ids) and ids[0] == {target}) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def text_prompts(tmp_path_factory) -> str:
    records = [{"id": f"t{i}", "prompt": q, "solution": "4"} for i, q in enumerate(TEXT_PROMPTS)]
    return write_json(tmp_path_factory.mktemp("data") / "text.json", records)


def likeliest_first_token(model_dir) -> tuple[int, float]:
    """The token the starting model most likely begins an answer to TEXT_PROMPTS with, and that probability
    (mean over the prompts, temperature 1)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    probs = 0
    for question in TEXT_PROMPTS:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": question}]}],
                                             add_generation_prompt=True)
        with torch.no_grad():
            logits = model(**processor(text=[text], return_tensors="pt")).logits[0, -1]
        probs = probs + torch.softmax(logits, -1) / len(TEXT_PROMPTS)
    return int(probs.argmax()), float(probs.max())


def test_a_learnable_reward_rises(tiny_model_dir, text_prompts, tmp_path):
    """Reward 1 when a completion starts with the token the starting model is likeliest to start with (a few per
    cent of the time): 30 steps of LoRA at a high rate make it the rule."""
    target, p = likeliest_first_token(tiny_model_dir)
    assert p < 0.3  # the task is not solved at the start
    (tmp_path / "first.py").write_text(FIRST_TOKEN.format(target=target))
    _, trainer = grpo(tiny_model_dir, tmp_path / "out", text_prompts, *LORA, "--learning_rate", "1e-2",
                      "--lr_scheduler_type", "constant", "--freeze_vision_tower", "true", "--freeze_merger", "true",
                      "--max_steps", "30", "--per_device_train_batch_size", "16", "--num_generations", "8",
                      "--max_completion_length", "6", "--reward_funcs", f"{tmp_path / 'first.py'}:first_token",
                      "--log_completions", "false", *COMMON)
    rewards = [h["reward"] for h in step_logs(trainer)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\ntarget token {target} (starting probability {p:.3f}); mean reward per step:\n"
          f"{' '.join(f'{r:.2f}' for r in rewards)}\nfirst 5 steps {first:.3f} -> last 5 steps {last:.3f}")
    assert len(rewards) == 30
    assert last > first + 0.5 and last > 0.8, rewards


# ------------------------------------------------------------------ 5. beta > 0: the KL to the reference
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_kl_is_logged_and_zero_at_step_1(tiny_model_dir, text_prompts, tmp_path, tuning):
    from vlft.train.preference.reference import AdaptersOff, FrozenCopy

    # a reward the random model's completions differ in, so that the policy moves after step 1
    (tmp_path / "parity.py").write_text("def parity(completion_ids, **kwargs):\n"
                                        "    return [float(ids[0] % 2) for ids in completion_ids]\n")
    flags = [*LORA, "--learning_rate", "1e-2"] if tuning == "lora" else ["--learning_rate", "1e-3"]
    _, trainer = grpo(tiny_model_dir, tmp_path / "out", text_prompts, *flags, "--beta", "0.1",
                      "--lr_scheduler_type", "constant", "--freeze_vision_tower", "true", "--max_steps", "3",
                      "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "6",
                      "--reward_funcs", f"{tmp_path / 'parity.py'}:parity", *COMMON)
    assert isinstance(trainer.reference, AdaptersOff if tuning == "lora" else FrozenCopy)
    kl = [h["kl"] for h in step_logs(trainer)]
    print(f"\n{tuning}: kl per step {kl}")
    assert len(kl) == 3
    assert abs(kl[0]) < 1e-7  # step 1: the policy is the reference
    assert kl[-1] > 1e-6  # the policy moved away from a reference that stayed


def test_a_thinking_prompt_logs_reasoning_and_answer_apart(tiny_model_factory, text_prompts, tmp_path):
    """Qwen3.5's think template: the GRPO prompt opens <think>, so a completion without </think> (a 4-token one from
    the tiny model) is unfinished reasoning - its answer is empty and accuracy gives it 0 even where it holds the
    solution."""
    out = tmp_path / "out"
    _, trainer = grpo(tiny_model_factory("qwen3_5"), out, text_prompts, *LORA, "--max_steps", "1",
                      "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
                      "--reward_funcs", "accuracy", "think_format", *COMMON)
    prompt = trainer.encoder.render(trainer.samples[0].messages, add_generation_prompt=True)[0]
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and any("</think>" not in row["completion"] for row in rows)
    for row in rows:
        assert (row["reasoning"], row["answer"]) == split_completion(row["completion"], prompt)
        if "</think>" not in row["completion"]:
            assert row["answer"] == "" and row["reasoning"] == row["completion"].strip("\n")
            assert row["rewards"]["think_format"] == 0.0
            assert row["rewards"]["accuracy"] == 0.0
