"""The DPO stage's data path: pairs -> [chosen; rejected] batches, over-long pairs cut or dropped, and the
completion log-probs the trainer computes from one batch equal to independent single-conversation forwards."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_MEDIA, FAMILIES, REPO

from vlft.constants import IGNORE_INDEX
from vlft.data.collator import SFTCollator
from vlft.data.dpo import PreferenceCollator, PreferenceDataset, PreferenceFormat
from vlft.data.encoding import ChatEncoder
from vlft.data.prepare import prepare_data
from vlft.data.sft import SFTDataset
from vlft.data.store import CUT
from vlft.train.core.model_inputs import model_inputs
from vlft.train.dpo.loss import preference_loss, sequence_logps
from vlft.train.dpo.trainer import completion_log_probs

DPO_DEMO = REPO / "data_examples" / "dpo_demo.json"


def prepare(path, processor, max_length=8192, mode="keep_start"):
    fmt = PreferenceFormat(max_length, mode)
    data = prepare_data(str(path), fmt.record_format(), processor=processor, image_folder=None, media=DEMO_MEDIA,
                        max_seq_length=max_length)
    return data, fmt


def dataset(data, processor, max_length=None, raw_pixels=True):
    return PreferenceDataset(data.samples, data.image_paths, processor, media=DEMO_MEDIA,
                             video_sources=data.video_sources, max_length=max_length, raw_pixels=raw_pixels,
                             rejected_media=data.rejected_media)


def test_batch_is_chosen_rows_then_rejected_rows(processor, tiny_model_dir):
    from vlft.models.loading import load_model

    data, _ = prepare(DPO_DEMO, processor)
    ds = dataset(data, processor)
    model, _ = load_model(str(tiny_model_dir))
    collate = PreferenceCollator(SFTCollator.for_model(processor, model))
    items = [ds[i] for i in (0, 4)]  # an image pair and a text-only pair
    batch = collate(items)
    assert batch["input_ids"].shape[0] == 4 and batch["pair_index"].tolist() == [0, 4]
    for row, (item, side) in enumerate([(items[0], "chosen"), (items[1], "chosen"),
                                        (items[0], "rejected"), (items[1], "rejected")]):
        ids = torch.cat([item["prompt_ids"], item[f"{side}_ids"]])
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids.tolist()
        assert batch["attention_mask"][row].sum() == n
        learned = batch["labels"][row] != IGNORE_INDEX
        assert not learned[:len(item["prompt_ids"])].any()  # nothing of the prompt is learned
        assert learned.sum() == item[f"{side}_mask"].sum()
    text = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert text == "A red square.<|im_end|>"
    # the image pair's pixels appear once per row that shows it: chosen row 0 and rejected row 2
    assert torch.equal(batch["image_grid_thw"], torch.cat([items[0]["image_grid_thw"]] * 2))
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"]] * 2))


def test_an_image_side_pair_shows_the_rejected_row_its_own_picture(processor, tiny_model_dir):
    from vlft.models.loading import load_model

    data, _ = prepare(DPO_DEMO, processor)
    ds = dataset(data, processor)
    ids = [s.id for s in data.samples]
    model, _ = load_model(str(tiny_model_dir))
    collate = PreferenceCollator(SFTCollator.for_model(processor, model))
    plain, side = ds[ids.index("image")], ds[ids.index("image_side")]
    assert "rejected_media" not in plain and set(side["rejected_media"]) == {"pixel_values", "image_grid_thw"}
    batch = collate([plain, side])  # rows: chosen image, chosen image_side, rejected image, rejected image_side
    grids = [plain["image_grid_thw"][0], side["image_grid_thw"][0], plain["image_grid_thw"][0],
             side["rejected_media"]["image_grid_thw"][0]]
    assert batch["image_grid_thw"].tolist() == [g.tolist() for g in grids]
    assert batch["pixel_values"].shape[0] == sum(int(g.prod()) for g in grids)
    assert torch.equal(batch["pixel_values"][-int(grids[3].prod()):], side["rejected_media"]["pixel_values"])
    # the plain pair's rejected row repeats its chosen row's picture; the image-side pair's shows its own
    assert batch["image_copy_of"].tolist() == [0, 1, 0, 3]
    for row, (prompt, answer) in enumerate([(plain["prompt_ids"], plain["chosen_ids"]),
                                            (side["prompt_ids"], side["chosen_ids"]),
                                            (plain["prompt_ids"], plain["rejected_ids"]),
                                            (side["rejected_prompt_ids"], side["rejected_ids"])]):
        n = len(prompt) + len(answer)
        assert batch["input_ids"][row, :n].tolist() == prompt.tolist() + answer.tolist()
    # each prompt holds as many image pads as its picture has vision tokens
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for prompt, grid in ((side["prompt_ids"], grids[1]), (side["rejected_prompt_ids"], grids[3])):
        assert int((prompt == pad).sum()) == int(grid.prod()) // 4
    # no 'rejected' in the record: the rejected sequence repeats the chosen answer with the other picture
    assert torch.equal(side["chosen_ids"], side["rejected_ids"])
    text = processor.tokenizer.decode(batch["labels"][3][batch["labels"][3] != IGNORE_INDEX])
    assert text == "A green circle.<|im_end|>"


def test_keep_start_cuts_answers_and_drop_drops(processor, tmp_path):
    records = [{"id": "long", "prompt": "Say it.", "chosen": "word " * 40, "rejected": "no"},
               {"id": "short", "prompt": "Say it.", "chosen": "yes", "rejected": "no"},
               {"id": "prompt_too_long", "prompt": "many words " * 40, "chosen": "yes", "rejected": "no"}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    encoder = ChatEncoder(processor)
    prompt_len = len(encoder.encode_prompt([{"role": "user", "content": "Say it."}]).input_ids)
    limit = prompt_len + 10

    data, fmt = prepare(path, processor, max_length=limit, mode="keep_start")
    assert [s.id for s in data.samples] == ["long", "short"]  # the prompt is never cut: that record is dropped
    assert data.flagged(CUT) == [0] and [p.index for p in data.overlong] == [2]  # cut: the store's CUT flag
    item = dataset(data, processor, max_length=limit)[0]
    assert len(item["prompt_ids"]) + len(item["chosen_ids"]) == limit == data.lengths[0]
    assert item["chosen_mask"].tolist() == [1] * 10  # the first 10 answer tokens, all learned
    full = encoder.encode_preference([{"role": "user", "content": "Say it."}], ["word " * 40, "no"])
    assert item["chosen_ids"].tolist() == full.completion_ids[0][:10]
    assert item["rejected_ids"].tolist() == full.completion_ids[1]  # the short answer is untouched

    data, fmt = prepare(path, processor, max_length=limit, mode="drop")
    assert [s.id for s in data.samples] == ["short"] and data.flagged(CUT) == []
    assert sorted(p.index for p in data.overlong) == [0, 2]


def reference_sum(model, processor, sample, answer, image_paths, video_sources):
    """Independent: the SFT path's float pixels for prompt + answer as one conversation, one plain forward of that
    row alone, log_softmax summed over what follows the generation prompt (its own ids from the SFT dataset's
    prompt mode) up to the answer's <|im_end|> (the last learned label). With a thinking template's default (thinking
    on) that includes the `</think>` closing an empty block, which the policy generates after `<think>\n`."""
    messages = list(sample.messages) + [{"role": "assistant", "content": answer}]
    row = SimpleNamespace(messages=messages, index=sample.index, id=sample.id)
    ds = SFTDataset([row], [image_paths], processor, media=DEMO_MEDIA, video_sources=[video_sources])
    prompt = SFTDataset([SimpleNamespace(messages=list(sample.messages), index=sample.index, id=sample.id)],
                        [image_paths], processor, media=DEMO_MEDIA, video_sources=[video_sources],
                        add_generation_prompt=True)[0]["input_ids"]
    batch = SFTCollator.for_model(processor, model)([ds[0]])
    labels = batch.pop("labels")
    assert torch.equal(batch["input_ids"][0, :len(prompt)], prompt)
    with torch.no_grad():
        logits = model(**batch).logits[0, :-1].double()
    targets = labels[0, 1:]
    last = int((targets != IGNORE_INDEX).nonzero().max())  # the answer's <|im_end|>, as a target position
    keep = torch.zeros_like(targets, dtype=torch.bool)
    keep[len(prompt) - 1:last + 1] = True
    targets = batch["input_ids"][0, 1:]
    return logits.log_softmax(-1)[keep].gather(-1, targets[keep, None]).sum().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_equal_independent_forwards_in_one_mixed_batch(family, tiny_model_factory):
    from vlft.models.loading import load_model, load_processor

    model_dir = str(tiny_model_factory(family))
    processor = load_processor(model_dir)
    model, fam = load_model(model_dir)
    model.double().eval()  # float64: the comparison checks which tokens are summed, not float32 rounding
    if fam.moe is not None:  # the grouped-matmul experts take no float64; the eager loop computes the same
        model.set_experts_implementation("eager")
    data, _ = prepare(DPO_DEMO, processor)
    ds = dataset(data, processor)
    kinds = {s.id: i for i, s in enumerate(data.samples)}
    assert set(kinds) == {"image", "multi_image", "video", "history", "text_only_2u1_flat", "image_side"}
    collate = PreferenceCollator(SFTCollator.for_model(processor, model))
    batch = model_inputs(collate([ds[i] for i in range(len(ds))]), model, image_norm=ds.image_norm,
                         video_norm=ds.video_norm)
    with torch.no_grad():
        per_token, mask = completion_log_probs(model, batch)
    chosen, rejected = sequence_logps(per_token, mask).chunk(2)
    for i, sample in enumerate(data.samples):
        for side, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
            # an image-side pair's rejected sequence: the same text with its own picture
            images, videos = ((data.image_paths[i], data.video_sources[i]) if side == "chosen"
                              or data.rejected_media[i] is None else data.rejected_media[i])
            want = reference_sum(model, processor, sample, getattr(sample, side), images, videos)
            assert math.isclose(got.item(), want, rel_tol=0, abs_tol=1e-5), (sample.id, side, got.item(), want)

    # the loss of the mixed batch is the mean of the pairs' own losses, each computed from a batch of its own
    ref_c, ref_r = chosen - 0.3, rejected + 0.2
    whole = preference_loss(chosen, rejected, ref_c, ref_r, beta=0.5).loss
    alone = []
    for i in range(len(ds)):
        single = model_inputs(collate([ds[i]]), model, image_norm=ds.image_norm, video_norm=ds.video_norm)
        with torch.no_grad():
            c, r = sequence_logps(*completion_log_probs(model, single)).chunk(2)
        alone.append(preference_loss(c, r, ref_c[i:i + 1], ref_r[i:i + 1], beta=0.5).loss)
    assert torch.allclose(whole, torch.stack(alone).mean(), atol=1e-6, rtol=0)


def test_a_rejected_video_pair_equals_independent_forwards_with_the_video_timing(tiny_model_factory, tmp_path):
    """An image + video prompt whose rejected sequence replaces the video (and keeps the image): on Qwen2.5-VL,
    whose mRoPE reads each video's `second_per_grid_ts`, both sequences' log-probs equal independent forwards, and
    vision-once encodes the shared image once and both videos."""
    from vlft.models.loading import load_model, load_processor

    model_dir = str(tiny_model_factory("qwen2_5_vl"))
    processor = load_processor(model_dir)
    model, _ = load_model(model_dir)
    model.double().eval()
    base = DPO_DEMO.parent
    record = {"id": "video_side", "image": str(base / "images/red_square.png"),
              "video": str(base / "videos/ball_left_right.mp4"), "rejected_video": str(base / "videos/color_cycle.mp4"),
              "conversations": [{"from": "human", "value": "<image>\n<video>\nDoes the clip show this shape?"}],
              "chosen": "Yes.", "rejected": "No."}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([record]))
    data, _ = prepare(path, processor)
    ds = dataset(data, processor)
    item = ds[0]
    assert set(item["rejected_media"]) == {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    batch = model_inputs(PreferenceCollator(SFTCollator.for_model(processor, model))([item]), model,
                         image_norm=ds.image_norm, video_norm=ds.video_norm)
    assert batch["image_copy_of"].tolist() == [0, 0] and batch["video_copy_of"].tolist() == [0, 1]
    assert batch["video_grid_thw"].shape[0] == 2 and len(batch["second_per_grid_ts"]) == 2
    with torch.no_grad():
        plain = sequence_logps(*completion_log_probs(model, batch))
        once = sequence_logps(*completion_log_probs(model, batch, vision_once=True))
    assert torch.allclose(plain, once, rtol=0, atol=1e-9)
    sample = data.samples[0]
    for row, side in enumerate(("chosen", "rejected")):
        images, videos = (data.image_paths[0], data.video_sources[0]) if side == "chosen" else data.rejected_media[0]
        want = reference_sum(model, processor, sample, getattr(sample, side), images, videos)
        assert math.isclose(plain[row].item(), want, rel_tol=0, abs_tol=1e-5), (side, plain[row].item(), want)
