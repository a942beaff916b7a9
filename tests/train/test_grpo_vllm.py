"""`vlft grpo --use_vllm` without vLLM (not installed here, and it needs a GPU): the plumbing around TRL's
VLLMGeneration, with a fake generator put in its place through the documented injection point
(`vlft.train.grpo.vllm_rollout.generator_factory`). The fake records what it is handed and answers with completions of
its own choosing; the tests check the prompt ids, the images (pixel for pixel against vlft's own resize), the
weight syncs per optimizer step, the completions reaching the training rows, the per-step image-token check in both
modes, and the start-up refusals by flag name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, demo_subset_file

import vlft.train.grpo.trainer as grpo_trainer
import vlft.train.grpo.vllm_rollout as vllm_rollout
from vlft.constants import IGNORE_INDEX
from vlft.data.media import fit_image, load_image
from vlft.data.pixels import patchify
from vlft.errors import VlftError
from vlft.train.grpo.run import run

GRPO_DEMO = REPO / "data_examples" / "grpo_demo.json"
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
          "--save_strategy", "no", "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16",
          "--lora_dropout", "0"]
G = 2
MAX_NEW = 6


def demo_file(tmp_path, ids) -> str:
    return demo_subset_file(GRPO_DEMO, ids, tmp_path / "prompts.json")


class FakeVLLM:
    """Stands in for trl's VLLMGeneration: records every call; completions are pieces of `answer_ids` ending with
    <|im_end|>, except every third one, which runs to max_completion_length without it (truncated).
    `short_pads`: report one image-pad token fewer in the processed prompt (colocate) or the server's features."""

    instances: list[FakeVLLM] = []

    def __init__(self, *, mode="colocate", short_pads=False, **kwargs):
        self.kwargs = {"mode": mode, **kwargs}
        self.mode = mode
        self.short_pads = short_pads
        self.calls: list[dict] = []
        self.events: list[str] = []  # "sync" / "generate", in order
        tokenizer = kwargs["processing_class"].tokenizer
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.answer_ids = tokenizer("<answer>3</answer> done", add_special_tokens=False)["input_ids"]
        FakeVLLM.instances.append(self)

    def sync_weights(self):
        self.events.append("sync")

    def _place_features(self, features, prompt_ids):  # TRL's server-mode hook, as in trl 1.16
        return features

    def generate(self, prompts, images, num_generations):
        self.events.append("generate")
        self.calls.append({"prompts": [list(p) for p in prompts], "images": images, "num_generations": num_generations})
        returned = [list(p) for p in prompts]
        if self.mode == "server" and images is not None:
            for ids, pictures in zip(prompts[::num_generations], images[::num_generations]):
                if pictures is None:
                    continue
                runs = vllm_rollout.pad_runs(ids, self.pad)
                if self.short_pads:
                    runs[0] -= 1
                self._place_features({"mm_placeholders": {"image": [{"offset": 0, "length": n} for n in runs]}}, ids)
        elif self.short_pads:
            for ids in returned:
                if self.pad in ids:
                    ids.remove(self.pad)
        completions = []
        for r in range(len(prompts)):
            if r % 3 == 2:
                completions.append((self.answer_ids * MAX_NEW)[:MAX_NEW])
            else:
                completions.append(self.answer_ids[:1 + r % len(self.answer_ids)] + [self.im_end])
        # the sampler's log-prob of each token: distinct per position, so a shifted alignment shows
        return returned, completions, [[[sampler_logp(t)] for t in range(len(c))] for c in completions], None


def sampler_logp(t: int) -> float:
    """The fake sampler's log-prob of completion token t: far above the tiny random model's (about -log(vocab) =
    -11.9) on even tokens, below it on odd ones, so ratios fall on both sides of 1."""
    return -0.25 * (t + 1) if t % 2 == 0 else -20.0


@pytest.fixture
def fake(monkeypatch):
    FakeVLLM.instances.clear()
    options = {}

    def factory(**kwargs):
        return FakeVLLM(**options, **kwargs)

    monkeypatch.setattr(vllm_rollout, "generator_factory", factory)
    return options


@pytest.fixture
def recorded_rows(monkeypatch):
    """Every training_rows call of the trainer: (items, completions, masks, the rows built)."""
    calls = []
    original = grpo_trainer.training_rows

    def recording(items, num_generations, completions, masks):
        rows = original(items, num_generations, completions, masks)
        calls.append((items, completions, masks, rows))
        return rows

    monkeypatch.setattr(grpo_trainer, "training_rows", recording)
    return calls


def grpo(model_dir, out, data, *flags):
    return run(["--model_id", str(model_dir), "--data_path", str(data), "--output_dir", str(out), *COMMON, *flags])


# ------------------------------------------------------------------ a GRPO run on the fake
def test_vllm_rollout_inputs_completions_and_syncs(tiny_model_dir, tmp_path, fake, recorded_rows):
    data = demo_file(tmp_path, ["count_1", "count_5_two_images", "text_only", "count_2"])
    _, trainer = grpo(tiny_model_dir, tmp_path / "run", data, "--use_vllm", "--max_steps", "2",
                      "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", str(2 * G),
                      "--num_generations", str(G), "--max_completion_length", str(MAX_NEW),
                      "--reward_funcs", "count", "--mask_truncated_completions", "true")
    (gen,) = FakeVLLM.instances
    assert gen.kwargs["mode"] == "colocate" and gen.kwargs["max_completion_length"] == MAX_NEW
    assert gen.kwargs["model"] is trainer.model and gen.kwargs["gpu_memory_utilization"] == 0.3
    # one sync before the first rollout of each optimizer step: 2 steps x 2 micro-batches
    assert gen.events == ["sync", "generate", "generate", "sync", "generate", "generate"]
    assert trainer.state.global_step == 2 and len(recorded_rows) == 4 == len(gen.calls)

    encoder, dataset = trainer.encoder, trainer.train_dataset
    patch, merge = encoder.patch_size, encoder.merge_size
    media = trainer.train_dataset.media
    seen_images = 0
    for call, (items, completions, masks, rows) in zip(gen.calls, recorded_rows):
        assert call["num_generations"] == G
        # the prompt ids handed over are the trainer's, each prompt G times
        expected = [dataset[int(it["record"])]["prompt_ids"].tolist() for it in items for _ in range(G)]
        assert call["prompts"] == expected
        assert call["prompts"] == [it["prompt_ids"].tolist() for it in items for _ in range(G)]
        # the images: PIL at vlft's fitted size (grid x patch), the very pixels of vlft's resize
        images = call["images"] or [None] * len(expected)
        for k, it in enumerate(items):
            sample = trainer.samples[int(it["record"])]
            for row in range(k * G, (k + 1) * G):
                pictures = images[row]
                if not sample.images:
                    assert pictures is None
                    continue
                paths = dataset.image_paths[int(it["record"])]
                assert len(pictures) == len(paths) == len(it["image_grid_thw"])
                n_pads = 0
                for picture, path, grid in zip(pictures, paths, it["image_grid_thw"].tolist()):
                    assert picture.size == (grid[2] * patch, grid[1] * patch)
                    fitted = fit_image(load_image(path), factor=patch * merge, min_pixels=media.image_min_pixels,
                                       max_pixels=media.image_max_pixels)
                    assert np.array_equal(np.asarray(picture), fitted.permute(1, 2, 0).numpy())
                    n_pads += grid[0] * grid[1] * grid[2] // merge**2
                    seen_images += 1
                assert call["prompts"][row].count(encoder.image_pad_id) == n_pads
        # the fake's completions are the training rows' labels (cut after <|im_end|>; truncated ones masked)
        for r, row in enumerate(rows):
            prompt_len = len(call["prompts"][r])
            labels = row["labels"]
            assert (labels[:prompt_len] == IGNORE_INDEX).all()
            assert row["input_ids"][:prompt_len].tolist() == call["prompts"][r]
            if r % 3 == 2:  # no <|im_end|> within --max_completion_length: truncated and masked out
                assert (labels[prompt_len:] == IGNORE_INDEX).all() and len(labels) == prompt_len + MAX_NEW
                assert masks[r].sum() == 0
            else:
                want = gen.answer_ids[:1 + r % len(gen.answer_ids)] + [gen.im_end]
                assert labels[prompt_len:].tolist() == want == completions[r].tolist()
    assert seen_images > 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and 0 < logs[0]["completions/clipped_ratio"] < 1


@pytest.mark.parametrize("mode, clip_max", [("sequence_truncate", "1e30"), ("token_mask", "1.0")])
def test_importance_sampling_correction_weights_the_loss(tiny_model_dir, tmp_path, fake, monkeypatch, mode, clip_max):
    """TRL's vLLM correction: the sampler's per-token log-probs reach the loss at their tokens' positions, and the
    ratio handed to grpo_loss is the closed form from the trainer's own log-probs of those tokens."""
    captured = []
    original = grpo_trainer.grpo_loss

    def spy(per_token, old, advantages, mask, **kwargs):
        captured.append((per_token.detach().clone(), mask.clone(), kwargs["sampling_ratio"]))
        return original(per_token, old, advantages, mask, **kwargs)

    monkeypatch.setattr(grpo_trainer, "grpo_loss", spy)
    data = demo_file(tmp_path, ["count_1", "text_only"])
    _, trainer = grpo(tiny_model_dir, tmp_path / "run", data, "--use_vllm", "--max_steps", "1",
                      "--per_device_train_batch_size", str(2 * G), "--num_generations", str(G),
                      "--max_completion_length", str(MAX_NEW), "--reward_funcs", "count",
                      "--vllm_importance_sampling_mode", mode, "--vllm_importance_sampling_clip_max", str(clip_max))
    (gen,) = FakeVLLM.instances
    (per_token, mask, ratio) = captured[0]
    # the sampler's log-prob of completion token t is sampler_logp(t): row by row, in token order
    sampler = torch.full_like(per_token, float("nan"))
    for r in range(per_token.shape[0]):
        n = int(mask[r].sum())
        sampler[r, mask[r].bool()] = torch.tensor([sampler_logp(t) for t in range(n)], dtype=per_token.dtype)
    gap = ((per_token - sampler) * mask).nan_to_num(0.0)
    if mode == "sequence_truncate":  # one ratio per completion: exp of the summed gap (the bound is not reached)
        want = torch.exp(gap.sum(-1, keepdim=True))
        assert ratio.shape == (per_token.shape[0], 1)
    else:  # one per token, zeroed above 1: the odd tokens, which the sampler found less likely than the trainer
        want = torch.exp(gap).masked_fill(torch.exp(gap) > 1.0, 0.0)
        assert ratio.shape == per_token.shape
        kept = ratio[mask.bool()]
        assert (kept == 0).any() and (kept > 0).any() and (kept < 1).all()
    assert torch.allclose(ratio, want, rtol=1e-5, atol=0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    gaps = (per_token - sampler).abs()[mask.bool()]
    assert logs[0]["sampling/sampling_logp_difference/max"] == pytest.approx(gaps.max().item(), rel=1e-5)
    assert logs[0]["sampling/sampling_logp_difference/mean"] == pytest.approx(gaps.mean().item(), rel=1e-5)


def test_default_path_does_not_touch_vllm(tiny_model_dir, tmp_path, fake):
    data = demo_file(tmp_path, ["count_1", "text_only"])
    _, trainer = grpo(tiny_model_dir, tmp_path / "run", data, "--max_steps", "1", "--per_device_train_batch_size",
                      str(2 * G), "--num_generations", str(G), "--max_completion_length", "4",
                      "--reward_funcs", "count")
    assert trainer.vllm is None and FakeVLLM.instances == []
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_image_token_mismatch_stops_the_run(tiny_model_dir, tmp_path, fake, mode):
    fake["short_pads"] = True
    data = demo_file(tmp_path, ["count_1"])
    flags = ["--vllm_mode", mode] if mode == "server" else []
    with pytest.raises(VlftError) as info:
        grpo(tiny_model_dir, tmp_path / "run", data, "--use_vllm", *flags, "--max_steps", "1",
             "--per_device_train_batch_size", str(G), "--num_generations", str(G), "--max_completion_length", "4",
             "--reward_funcs", "count")
    (gen,) = FakeVLLM.instances
    ours = gen.calls[0]["prompts"][0].count(gen.pad)
    message = str(info.value)
    assert "record 0 (id 'count_1')" in message
    assert f"used {ours - 1} image tokens" in message and f"vlft's prompt has {ours}" in message
    assert "--image_min_pixels / --image_max_pixels" in message and "min_pixels / max_pixels" in message
    assert gen.events[:2] == ["sync", "generate"]


# ------------------------------------------------------------------ pieces
def test_unpatchify_inverts_patchify():
    image = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    rows, grid = patchify(image[None], patch_size=14, merge_size=2, temporal_patch_size=2)
    back = vllm_rollout.unpatchify_image(rows, grid, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert back.size == (84, 56) and np.array_equal(np.asarray(back), image.permute(1, 2, 0).numpy())


def test_completion_rows():
    end, vision = [7, 8], {99}
    rows = [[1, 2, 7, 5], [1, 2, 3], [1, 2], [1, 99, 7], [4, 8]]
    logprobs = [[[-0.1 * (k + 1) - t] for t in range(len(row))] for k, row in enumerate(rows)]
    ids, masks, cut, sampling = vllm_rollout.completion_rows(rows, end_ids=end, vision_ids=vision,
                                                             max_completion_length=3, mask_truncated=True,
                                                             logprobs=logprobs)
    assert [i.tolist() for i in ids] == [[1, 2, 7], [1, 2, 3], [1, 2, 7], [1], [4, 8]]
    assert cut == [False, True, False, True, False]
    assert [m.tolist() for m in masks] == [[1, 1, 1], [0, 0, 0], [1, 1, 1], [0], [1, 1]]
    # the sampler's log-probs follow the kept tokens; the <|im_end|> vlft appended has none (NaN)
    assert [len(x) for x in sampling] == [len(i) for i in ids]
    assert torch.allclose(sampling[0], torch.tensor([-0.1, -1.1, -2.1])) and sampling[3].tolist() == [
        pytest.approx(-0.4)]
    assert sampling[2][:2].tolist() == pytest.approx([-0.3, -1.3]) and torch.isnan(sampling[2][2])
    assert vllm_rollout.completion_rows(rows, end_ids=end, vision_ids=vision, max_completion_length=3,
                                        mask_truncated=True)[3] is None


# ------------------------------------------------------------------ refusals
BASE = ["--model_id", "nowhere", "--data_path", "nowhere.json", "--output_dir"]


def refusal(tmp_path, *flags) -> str:
    with pytest.raises(VlftError) as info:
        run([*BASE, str(tmp_path / "out"), *flags])
    return str(info.value)


def test_use_vllm_without_vllm_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_rollout, "vllm_installed", lambda: False)  # also where vllm is installed (a GPU box)
    assert vllm_rollout.generator_factory is vllm_rollout.trl_generator
    message = refusal(tmp_path, "--use_vllm")
    assert "--use_vllm needs the vllm package" in message and "pip install vllm" in message


@pytest.mark.parametrize(("flags", "expected"), [
    (["--vllm_mode", "server"], "--vllm_mode: only used with --use_vllm"),
    (["--use_vllm", "--vllm_server_port", "9000"], "--vllm_server_port: server-mode setting(s), not used with "
                                                   "--vllm_mode colocate"),
    (["--use_vllm", "--vllm_mode", "server", "--vllm_gpu_memory_utilization", "0.5", "--vllm_enable_sleep_mode",
      "true"], "--vllm_gpu_memory_utilization, --vllm_enable_sleep_mode: colocate-mode setting(s), not used with "
               "--vllm_mode server"),
    (["--use_vllm", "--loss_type", "vespo"], "--loss_type vespo with --vllm_importance_sampling_mode sequence_mask"),
    (["--vllm_importance_sampling_mode", "token_mask"], "--vllm_importance_sampling_mode: only used with --use_vllm"),
    (["--use_vllm", "--vllm_gpu_memory_utilization", "1.5"], "--vllm_gpu_memory_utilization must be in (0, 1]"),
    (["--use_vllm", "--vllm_mode", "both"], "--vllm_mode"),
])
def test_flag_refusals(tmp_path, fake, flags, expected):
    assert expected in refusal(tmp_path, *flags)


def test_tensor_parallel_must_divide_processes(tmp_path, fake, monkeypatch):
    from vlft.config import parse_args, validate
    from vlft.train.grpo.config import GROUPS as GRPO_GROUPS

    groups = parse_args(GRPO_GROUPS, [*BASE, str(tmp_path / "out"), "--use_vllm", "--vllm_tensor_parallel_size", "3"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(VlftError, match="--vllm_tensor_parallel_size 3 does not divide the 4 training processes"):
        validate(*groups)
    monkeypatch.setenv("WORLD_SIZE", "6")
    validate(*groups)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--peft_type", "prompt_tuning", "--num_virtual_tokens", "4"], "--use_vllm with --peft_type prompt_tuning"),
    (["--lora_enable", "true", "--bits", "8"], "--use_vllm with --bits 8"),
    (["--vllm_max_model_length", "100", "--max_prompt_length", "90", "--max_completion_length", "20"],
     "--vllm_max_model_length 100 is shorter than the longest prompt allowed (--max_prompt_length 90) plus "
     "--max_completion_length 20 = 110"),
])
def test_combination_refusals(tmp_path, fake, flags, expected):
    assert expected in refusal(tmp_path, "--use_vllm", *flags)


def test_video_records_are_refused_before_the_model_loads(tiny_model_dir, tmp_path, fake, monkeypatch):
    import vlft.train.core.setup as setup

    monkeypatch.setattr(setup, "prepare_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = demo_file(tmp_path, ["count_1", "video", "text_only"])
    with pytest.raises(VlftError) as info:
        grpo(tiny_model_dir, tmp_path / "run", data, "--use_vllm", "--max_steps", "1", "--reward_funcs", "count",
             "--per_device_train_batch_size", str(G), "--num_generations", str(G))
    message = str(info.value)
    assert f"--use_vllm: {data} has 1 record(s) with video" in message and "record(s) 1 (id 'video')" in message
    assert FakeVLLM.instances == []
