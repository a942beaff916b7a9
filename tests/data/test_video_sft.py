"""Video and mixed-media records on every family: ids, pixels, grids and timing match what the model's own
processor produces for the same sampled frames, labels stay on the answers, and bad videos are reported."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO_MEDIA, FAMILIES, REPO

from vlft.constants import IGNORE_INDEX, IM_END
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset
from vlft.data.video import load_video
from vlft.errors import DataError
from vlft.models.loading import load_processor

VIDEO_DATA = REPO / "data_examples" / "llava_video_demo.json"
MEDIA_ROOT = REPO / "data_examples"
RECORDS = json.loads(VIDEO_DATA.read_text())


# Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE share Qwen3-VL's processor: timestamps written into the text
TIMESTAMPED = ("qwen3_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")


@pytest.fixture(scope="module", params=FAMILIES)
def family_data(request, tiny_model_factory):
    processor = load_processor(str(tiny_model_factory(request.param)))
    checked = prepare_sft_data(str(VIDEO_DATA), processor=processor, image_folder=str(MEDIA_ROOT), media=DEMO_MEDIA,
                             max_seq_length=4096)
    dataset = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA,
                         video_sources=checked.video_sources)
    return request.param, processor, checked, dataset


def test_check_lengths_equal_dataset_lengths(family_data):
    _, _, checked, dataset = family_data
    assert len(checked.samples) == len(RECORDS)
    assert checked.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=[r["id"] for r in RECORDS])
def test_matches_the_processor(family_data, i):
    """Our encoding of the sampled frames equals the processor's own call on the template text."""
    from transformers.video_utils import VideoMetadata

    family, processor, checked, dataset = family_data
    item = dataset[i]
    sample = checked.samples[i]
    video_kw = DEMO_MEDIA.video_kwargs(dataset.encoder)
    clips = [load_video(src, **video_kw) for src in checked.video_sources[i]]
    kwargs = dict(do_resize=False, do_sample_frames=False, return_tensors="pt")
    if clips:
        kwargs["videos"] = [c.frames for c in clips]
        kwargs["video_metadata"] = [VideoMetadata(fps=c.source_fps, frames_indices=c.indices,
                                                  total_num_frames=round(c.duration * c.source_fps)) for c in clips]
        if family == "qwen2_5_vl":  # the processor takes one fps for all videos of the call
            assert len({c.fps for c in clips}) == 1
            kwargs["fps"] = clips[0].fps
    if checked.image_paths[i]:
        from vlft.data.media import fit_image, load_image

        kwargs["images"] = [fit_image(load_image(p), factor=16, min_pixels=DEMO_MEDIA.image_min_pixels,
                                      max_pixels=DEMO_MEDIA.image_max_pixels) for p in checked.image_paths[i]]
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    ref = processor(text=[text], **kwargs)
    assert torch.equal(item["input_ids"], ref["input_ids"][0])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (key in item) == (key in ref), key
        if key in item:
            assert torch.equal(item[key], ref[key]), key  # bit for bit
    if clips:
        tps = dataset.encoder.temporal_patch_size
        assert item["second_per_grid_ts"] == [tps / c.fps for c in clips]
        if family == "qwen2_5_vl":
            assert torch.allclose(torch.tensor(item["second_per_grid_ts"]), ref["second_per_grid_ts"].float())
        video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        assert int((item["input_ids"] == video_pad).sum()) == int((item["video_grid_thw"].prod(-1) // 4).sum())
        if family in TIMESTAMPED:  # timestamps of each temporal patch are written into the text
            assert "seconds>" in processor.tokenizer.decode(item["input_ids"])
    answers = [t["value"] + IM_END for t in RECORDS[i]["conversations"] if t["from"] == "gpt"]
    trained = item["labels"] != IGNORE_INDEX
    runs, current = [], []
    for tok, on in zip(item["input_ids"].tolist(), trained.tolist()):
        if on:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [processor.tokenizer.decode(r) for r in runs] == answers


def test_short_video_is_padded_to_one_temporal_patch(family_data):
    _, _, checked, dataset = family_data
    i = [r["id"] for r in RECORDS].index("one_frame_video")
    grid = dataset[i]["video_grid_thw"]
    assert grid.tolist()[0][0] == 1  # one frame repeated to the temporal patch size (2): one temporal patch


# --- bad videos, all found by the start-up check ---


def write(tmp_path, video_value, text="<video>\nWhat?"):
    records = [RECORDS[7], {"id": "bad", "video": video_value,
                            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def truncated(tmp_path):
    data = (MEDIA_ROOT / "videos" / "ball_left_right.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "cut.mp4")


def audio_only(tmp_path):
    import av
    import numpy as np

    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


def not_a_video(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is text")
    return str(tmp_path / "notes.mp4")


def frames_with_a_hole(tmp_path):
    folder = tmp_path / "frames"
    shutil.copytree(MEDIA_ROOT / "videos" / "frames_square", folder)
    return [[str(folder / "frame_1.png"), str(folder / "frame_99.png")]]  # one video given as frames


@pytest.mark.parametrize("make,field,words", [
    (lambda t: str(t / "missing.mp4"), "video[0]", "does not exist"),
    (not_a_video, "video[0]", "notes.mp4"),
    (truncated, "video[0]", "cut.mp4"),
    (audio_only, "video[0]", "audio.m4a"),
    (frames_with_a_hole, "video[0]", "frame_99.png"),
])
def test_bad_video_is_reported_before_training(tmp_path, processor, make, field, words):
    path = write(tmp_path, make(tmp_path))
    with pytest.raises(DataError) as err:
        prepare_sft_data(str(path), processor=processor, image_folder=str(MEDIA_ROOT), media=DEMO_MEDIA,
                       max_seq_length=4096)
    (problem,) = err.value.problems
    assert (problem.index, problem.record_id, problem.field) == (1, "bad", field)
    assert words in problem.message and problem.hint
    checked = prepare_sft_data(str(path), processor=processor, image_folder=str(MEDIA_ROOT), media=DEMO_MEDIA,
                             max_seq_length=4096, skip_bad_samples=True)
    assert [s.id for s in checked.samples] == ["text_only"] and len(checked.skipped) == 1


def test_video_tag_count_mismatch(tmp_path, processor):
    path = write(tmp_path, "videos/ball_left_right.mp4", text="<video> and <video>?")
    with pytest.raises(DataError) as err:
        prepare_sft_data(str(path), processor=processor, image_folder=str(MEDIA_ROOT), media=DEMO_MEDIA,
                       max_seq_length=4096)
    (problem,) = err.value.problems
    assert problem.field == "video" and "2 <video> tag(s)" in problem.message


def test_video_frame_budget_caps_the_sequence(processor):
    """--video_max_total_pixels bounds a video's tokens whatever its length."""
    from dataclasses import replace

    small = replace(DEMO_MEDIA, nframes=8, video_max_total_pixels=8 * 1024)
    checked = prepare_sft_data(str(VIDEO_DATA), processor=processor, image_folder=str(MEDIA_ROOT), media=small,
                             max_seq_length=4096)
    big = replace(DEMO_MEDIA, nframes=8, video_max_total_pixels=8 * 4096)
    checked_big = prepare_sft_data(str(VIDEO_DATA), processor=processor, image_folder=str(MEDIA_ROOT), media=big,
                                 max_seq_length=4096)
    i = [s.id for s in checked.samples].index("video_file")
    assert checked.lengths[i] < checked_big.lengths[i]
