"""A run serves as it trained (issue 14): the processor saved with a run, with each checkpoint-N and with a merged
model gives the image and video grids training gave, where the base model's processor gives others; vlft predict
on a merged model encodes with training's settings.

Training's grids are taken from training itself (the trainer's dataset items), never from hard-coded numbers, and
each test first checks that the base processor gives another grid, so that it can fail.
"""
from __future__ import annotations

import json
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import FAMILIES
from PIL import Image

from vlft.data.prepare import MediaSettings
from vlft.data.processor_media import apply_media_settings, media_settings_from_args
from vlft.merge import merge
from vlft.predict import main as predict_main
from vlft.run_dir import MEDIA_FILE, read_run_args
from vlft.train.sft.run import run

SOURCE_FPS, SOURCE_FRAMES, WIDTH, HEIGHT = 10, 30, 130, 94  # a 3 s clip, sides off the tiny model's 16-pixel factor
# Non-default budgets: images 128x128 -> 64x64 (the base processor: 128x128); frames capped by the total budget.
# --fps 4 over 3 s asks 12 frames, --video_max_frames 8 caps them: 8 frames whatever the sampler's rounding.
MEDIA_FLAGS = ["--image_min_pixels", "256", "--image_max_pixels", "4096", "--video_min_pixels", "256",
               "--video_max_pixels", "2048", "--video_max_total_pixels", "4096", "--fps", "4", "--video_max_frames", "8"]


def frame(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 / (WIDTH - 1), y * 255 / (HEIGHT - 1), (x * 3 + y + 9 * i) % 256], -1)
    return np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)


def write_clip(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(SOURCE_FPS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "18", "g": "5"}
        for i in range(SOURCE_FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded_frames(path) -> np.ndarray:
    """Every frame at its stored size, [N, H, W, 3] uint8: what a reader hands a processor before it resizes."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def media_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(root / "square.png")
    write_clip(root / "clip.mp4")
    records = [
        {"id": "image", "image": "square.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "video", "video": "clip.mp4",
         "conversations": [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A bar."}]},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tiny_model_factory, media_data, tmp_path_factory):
    """Two LoRA steps with non-default media settings, a checkpoint after each; the trainer's dataset items of the
    image and the video record (what training fed the model), and the merged model."""
    model_dir = tiny_model_factory(request.param)
    out = tmp_path_factory.mktemp(f"media-{request.param}")
    _, trainer = run(["--model_id", str(model_dir), "--data_path", str(media_data / "data.json"),
                      "--output_dir", str(out / "run"), "--lora_enable", "true", "--lora_rank", "4",
                      "--lora_alpha", "8", "--per_device_train_batch_size", "2", "--max_steps", "2",
                      "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true", "--seed", "0",
                      *MEDIA_FLAGS])
    items = {s.id: trainer.train_dataset[i] for i, s in enumerate(trainer.train_dataset.samples)}
    merged = merge(str(out / "run"), str(out / "merged"), dtype="fp32")
    return request.param, model_dir, out / "run", merged, items, trainer.train_dataset


def saved_dirs(run_dir, merged):
    return {"run": run_dir, "checkpoint-1": run_dir / "checkpoint-1", "checkpoint-2": run_dir / "checkpoint-2",
            "merged": merged}


def test_saved_processors_give_the_trained_image_grid(trained, media_data):
    from transformers import AutoProcessor

    _, model_dir, run_dir, merged, items, dataset = trained
    image = Image.open(media_data / "square.png").convert("RGB")
    want = items["image"]["image_grid_thw"].tolist()
    base = AutoProcessor.from_pretrained(str(model_dir)).image_processor(images=[image], return_tensors="pt")
    assert base["image_grid_thw"].tolist() != want  # the base processor serves another resolution
    for name, directory in saved_dirs(run_dir, merged).items():
        got = AutoProcessor.from_pretrained(str(directory)).image_processor(images=[image], return_tensors="pt")
        assert got["image_grid_thw"].tolist() == want, name
        # and the very pixels training fed the model (uint8 rows there, normalised on the device)
        assert torch.equal(dataset.image_norm(items["image"]["pixel_values"]), got["pixel_values"]), name


def test_saved_processors_give_the_trained_video_grid(trained, media_data):
    """Given the frames training sampled, every saved processor sizes them as training did (grid and pixels). Given
    the whole clip and its metadata, it samples as many frames (the settings make the count unambiguous) and so
    gives the same grid; Qwen3-VL's sampler also picks the same frames, Qwen2-VL's and Qwen2.5-VL's do not."""
    from transformers import AutoProcessor

    from vlft.data.encoding import ChatEncoder
    from vlft.data.video import load_video
    from vlft.models.registry import get_family

    family, model_dir, run_dir, merged, items, dataset = trained
    want = items["video"]["video_grid_thw"].tolist()
    media = media_settings_from_args(read_run_args(run_dir), get_family(family))
    clip = load_video(media_data / "clip.mp4", **media.video_kwargs(ChatEncoder(AutoProcessor.from_pretrained(
        str(run_dir)))))
    every = decoded_frames(media_data / "clip.mp4")
    assert len(every) == SOURCE_FRAMES
    sampled = every[clip.indices]
    metadata = [{"total_num_frames": SOURCE_FRAMES, "fps": float(SOURCE_FPS), "duration": SOURCE_FRAMES / SOURCE_FPS}]

    base = AutoProcessor.from_pretrained(str(model_dir)).video_processor
    base_grid = base(videos=[sampled], do_sample_frames=False, cap_pixels_per_frame=True, return_tensors="pt")
    assert base_grid["video_grid_thw"].tolist() != want
    for name, directory in saved_dirs(run_dir, merged).items():
        vp = AutoProcessor.from_pretrained(str(directory)).video_processor
        given = vp(videos=[sampled], do_sample_frames=False, return_tensors="pt")
        assert given["video_grid_thw"].tolist() == want, name
        assert torch.equal(dataset.video_norm(items["video"]["pixel_values_videos"]), given["pixel_values_videos"])
        own = vp(videos=[every], video_metadata=metadata, return_metadata=True, return_tensors="pt")
        assert own["video_grid_thw"].tolist() == want, name
        indices = [int(i) for i in own["video_metadata"][0].frames_indices]
        assert len(indices) == len(clip.indices)
        if family == "qwen3_vl":  # the same linspace rule as vlft's (qwen-vl-utils'): the same frames
            assert indices == list(clip.indices)
            assert torch.equal(given["pixel_values_videos"], own["pixel_values_videos"])


def test_merged_model_records_training_media(trained):
    family, _, run_dir, merged, _, _ = trained
    record = json.loads((merged / MEDIA_FILE).read_text())
    args = read_run_args(run_dir)
    assert record == {k: args[k] for k in record}  # exactly the resolved settings of vlft_args.json
    assert record["image_max_pixels"] == 4096 and record["fps"] == 4 and record["video_max_frames"] == 8


def test_merge_of_a_run_saved_before_the_fix_applies_its_recorded_settings(trained, tmp_path, media_data):
    """A run whose saved processor is still the base model's: merge takes the settings from its vlft_args.json."""
    from transformers import AutoProcessor

    _, model_dir, run_dir, _, items, _ = trained
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copy(model_dir / "processor_config.json", old / "processor_config.json")
    image = Image.open(media_data / "square.png").convert("RGB")
    want = items["image"]["image_grid_thw"].tolist()
    assert AutoProcessor.from_pretrained(str(old)).image_processor(images=[image])["image_grid_thw"].tolist() != want
    merged = merge(str(old), str(tmp_path / "merged"), dtype="fp32")
    got = AutoProcessor.from_pretrained(str(merged)).image_processor(images=[image], return_tensors="pt")
    assert got["image_grid_thw"].tolist() == want
    assert (merged / MEDIA_FILE).is_file()


def test_predict_on_the_merged_model_encodes_as_training_did(trained, media_data, tmp_path, monkeypatch):
    """vlft predict --model <merged dir> (no vlft_args.json there) feeds the model training's grids and as many image
    and video pad tokens; an explicit flag still wins."""
    import vlft.data.sft
    from vlft.constants import IMAGE_PAD, VIDEO_PAD

    _, _, _, merged, items, dataset = trained
    seen = []

    class Recording(vlft.data.sft.SFTDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            seen.append(item)
            return item

    monkeypatch.setattr(vlft.data.sft, "SFTDataset", Recording)
    pads = [dataset.encoder.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD)]

    def predict_grids(*flags):
        seen.clear()
        out = tmp_path / f"p{len(list(tmp_path.iterdir()))}.jsonl"
        assert predict_main(["--model", str(merged), "--data_path", str(media_data / "data.json"), "--output",
                             str(out), "--max_new_tokens", "2", *flags]) == 0
        return {key: item[key].tolist() for item in seen for key in ("image_grid_thw", "video_grid_thw")
                if key in item}, [sum(int((item["input_ids"] == p).sum()) for item in seen) for p in pads]

    grids, counts = predict_grids()
    assert grids == {"image_grid_thw": items["image"]["image_grid_thw"].tolist(),
                     "video_grid_thw": items["video"]["video_grid_thw"].tolist()}
    trained_counts = [sum(int((items[k]["input_ids"] == p).sum()) for k in items) for p in pads]
    assert counts == trained_counts and all(trained_counts)
    grids, _ = predict_grids("--image_max_pixels", "16384")  # the user's flag wins over the merged model's record
    assert grids["image_grid_thw"] == [[1, 16, 16]] != items["image"]["image_grid_thw"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_sizes_match_vlft_where_the_processor_can(family, tiny_model_factory):
    """The per-frame size rule for many frame counts and sizes, without training: the processor with the settings
    applied sizes frames as vlft (qwen-vl-utils) does, total budget included. The one documented exception: Qwen3-VL's
    processor bounds the whole clip from below, so a frame vlft scales *up* to --video_min_pixels stays smaller."""
    from vlft.data.video_sampling import frame_size
    from vlft.models.loading import load_processor

    processor = load_processor(str(tiny_model_factory(family)))
    clip_bounded = type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"  # Qwen3-VL, its MoE, Qwen3.5
    media = MediaSettings(image_min_pixels=256, image_max_pixels=4096, video_min_pixels=512, video_max_pixels=4096,
                          video_max_total_pixels=12000)
    vp = apply_media_settings(processor, media).video_processor
    factor, patch = vp.patch_size * vp.merge_size, vp.patch_size
    upscaled = []
    for t in (2, 4, 8, 16):
        for height, width in ((94, 130), (40, 200), (300, 170), (20, 30), (64, 64), (16, 16), (12, 20)):
            h, w = frame_size(height, width, t, factor=factor, min_pixels=media.video_min_pixels,
                              max_pixels=media.video_max_pixels, total_pixels=media.video_max_total_pixels,
                              temporal_patch_size=vp.temporal_patch_size)
            got = vp(videos=[np.zeros((t, height, width, 3), np.uint8)], do_sample_frames=False)["video_grid_thw"]
            want = [t // vp.temporal_patch_size, h // patch, w // patch]
            scaled_up = max(1, round(height / factor)) * max(1, round(width / factor)) * factor**2 < media.video_min_pixels
            if clip_bounded and scaled_up:
                upscaled.append((t, height, width))
                assert got.tolist() != [want]
            else:
                assert got.tolist() == [want], (t, height, width)
    assert bool(upscaled) == clip_bounded


def test_total_budget_is_exact(tiny_model_factory):
    """The processors compute the total video budget from max_video_tokens in floating point; the value written
    lands on vlft's budget exactly, not one pixel below."""
    from vlft.models.loading import load_processor

    processor = load_processor(str(tiny_model_factory("qwen2_vl")))
    for total in (4096, 12000, 8192 * 784, 12345, 1):
        media = MediaSettings(image_min_pixels=256, image_max_pixels=4096, video_max_total_pixels=total)
        vp = apply_media_settings(processor, media).video_processor
        factor = vp.patch_size * vp.merge_size
        assert int(vp.max_video_tokens * factor * factor * 0.9) == total
