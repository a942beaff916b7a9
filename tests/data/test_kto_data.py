"""The KTO stage's data: records (both layouts, the label's spellings, every defect named by file, record, id and
field), preparation and the over-long policy, items with their KL answer (the pairing rule), the [completion; KL]
batches, the balance of labels, and the completion log-probs of one mixed batch (image, video, text) equal to a
plain forward of each conversation through the model's own processor."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DEMO_MEDIA, FAMILIES, REPO

from vlft.constants import IGNORE_INDEX
from vlft.data.encoding import ChatEncoder
from vlft.data.kto import (
    KTOCollator,
    LabelBalance,
    build_collator,
    build_dataset,
    kl_partner,
    label_balance,
    parse_kto_record,
    record_format,
)
from vlft.data.prepare import prepare_data
from vlft.data.store import CUT
from vlft.errors import VlftError

KTO_DEMO = REPO / "data_examples" / "kto_demo.json"
GOOD = {"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}],
        "completion": "A cat.", "label": True}


def problems(record):
    sample, found = parse_kto_record(record, 3, "thumbs.json")
    assert sample is None
    return {p.field: str(p) for p in found}


def prepare(path, processor, max_length=8192, mode="keep_start"):
    options = type("Options", (), {"truncation_mode": mode})()
    return prepare_data(str(path), record_format(max_length, options), processor=processor, image_folder=None,
                        media=DEMO_MEDIA, max_seq_length=max_length)


# ------------------------------------------------------------------ records
def test_llava_and_flat_layouts_give_the_same_sample():
    llava, found = parse_kto_record(GOOD, 0, "f")
    assert not found
    flat, found = parse_kto_record({"id": "g", "image": "a.png", "prompt": "<image>\nWhat is it?",
                                    "completion": {"from": "gpt", "value": "A cat."}, "label": 1}, 0, "f")
    assert not found and flat == llava
    assert llava.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (llava.completion, llava.label, llava.images) == ("A cat.", True, ["a.png"])
    assert llava.completions == ({"role": "assistant", "content": "A cat."},)


@pytest.mark.parametrize("value,label", [(True, True), (False, False), (1, True), (0, False), (1.0, True)])
def test_label_spellings(value, label):
    sample, found = parse_kto_record({**GOOD, "label": value}, 0, "f")
    assert not found and sample.label is label


def test_reasoning_is_read_as_dpo_reads_it():
    inline, _ = parse_kto_record({**GOOD, "completion": "<think>It has whiskers.</think>A cat."}, 0, "f")
    field, _ = parse_kto_record({**GOOD, "completion": {"from": "gpt", "value": "A cat.",
                                                        "reasoning_content": "It has whiskers."}}, 0, "f")
    assert inline == field and inline.completion == "A cat." and inline.completion_reasoning == "It has whiskers."
    assert inline.completions[0]["reasoning_content"] == "It has whiskers."


@pytest.mark.parametrize("change,field,words", [
    ({"label": None}, "label", "'label' is missing"),
    ({"label": "true"}, "label", "the string 'true'"),
    ({"label": 2}, "label", "'label' is 2"),
    ({"label": [1]}, "label", "'label' is [1]"),
    ({"completion": None}, "completion", "'completion' is missing"),
    ({"completion": "  "}, "completion", "the completion answer is empty"),
    ({"completion": {"from": "human", "value": "A cat."}}, "completion.from", "speaker is 'human'"),
    ({"completion": "A <image> cat."}, "completion", "<image> in a gpt turn"),
    ({"image": ["a.png", "b.png"]}, "image", "1 <image> tag(s) in the human turns but 2 image path(s)"),
    ({"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
     "conversations[1]", "the prompt ends with a gpt turn"),
])
def test_each_defect_names_its_field(change, field, words):
    found = problems({**GOOD, **change})
    assert field in found, found
    assert words in found[field]
    assert found[field].startswith("thumbs.json: record 3 (id 'g'), field ")


def test_flat_layout_problems_name_the_prompt():
    found = problems({"id": "g", "prompt": "  ", "completion": "A cat.", "label": True})
    assert list(found) == ["prompt"] and "needs non-empty text" in found["prompt"]


def test_a_preference_pair_is_pointed_to_dpo():
    found = problems({**{k: v for k, v in GOOD.items() if k not in ("completion", "label")},
                      "chosen": "A cat.", "rejected": "A dog."})
    assert list(found) == ["chosen"] and "vlft dpo" in found["chosen"] and '"label": false' in found["chosen"]


# ------------------------------------------------------------------ preparation
def test_demo_prepares_and_each_length_is_prompt_plus_answer(processor):
    data = prepare(KTO_DEMO, processor)
    raw = json.loads(KTO_DEMO.read_text())
    assert [s.id for s in data.samples] == [r["id"] for r in raw]
    assert [s.label for s in data.samples] == [bool(r["label"]) for r in raw]
    encoder = ChatEncoder(processor)
    for i, sample in enumerate(data.samples):
        enc = encoder.encode_preference(sample.messages, sample.completions, data.image_specs[i],
                                        data.video_specs[i])
        assert data.sequence_lengths[i] == (len(enc.prompt_ids) + len(enc.completion_ids[0]),)
    assert record_format(4096).used_keys >= {"conversations", "prompt", "completion", "label", "image", "video"}


def test_keep_start_cuts_the_answer_and_drop_drops(processor, tmp_path):
    records = [{"id": "long", "prompt": "Say it.", "completion": "word " * 40, "label": True},
               {"id": "short", "prompt": "Say it.", "completion": "no", "label": False},
               {"id": "prompt_too_long", "prompt": "many words " * 40, "completion": "yes", "label": True}]
    path = tmp_path / "thumbs.json"
    path.write_text(json.dumps(records))
    encoder = ChatEncoder(processor)
    prompt_len = len(encoder.encode_prompt([{"role": "user", "content": "Say it."}]).input_ids)
    limit = prompt_len + 10

    data = prepare(path, processor, max_length=limit, mode="keep_start")
    assert [s.id for s in data.samples] == ["long", "short"]  # the prompt is never cut
    assert data.flagged(CUT) == [0] and [p.index for p in data.overlong] == [2]
    ds = build_dataset(data, processor, media=DEMO_MEDIA, max_length=limit, thinking=None)
    long, short = ds[0], ds[1]
    assert len(long["prompt_ids"]) + len(long["completion_ids"]) == limit == data.lengths[0]
    assert long["completion_mask"].tolist() == [1] * 10
    # the KL answer (the other record's) is cut to fit too: the short record's KL answer is the long one
    assert len(short["prompt_ids"]) + len(short["kl_ids"]) == limit
    full = encoder.encode_preference([{"role": "user", "content": "Say it."}], ["word " * 40, "no"])
    assert short["kl_ids"].tolist() == full.completion_ids[0][:10]
    assert long["kl_ids"].tolist() == full.completion_ids[1] == short["completion_ids"].tolist()

    data = prepare(path, processor, max_length=limit, mode="drop")
    assert [s.id for s in data.samples] == ["short"] and data.flagged(CUT) == []
    assert sorted(p.index for p in data.overlong) == [0, 2]


# ------------------------------------------------------------------ items and batches
def test_kl_partner_is_half_the_set_away():
    assert [kl_partner(i, 9) for i in range(9)] == [4, 5, 6, 7, 8, 0, 1, 2, 3]
    assert [kl_partner(i, 2) for i in range(2)] == [1, 0]
    for n in range(2, 12):  # never the item itself, every item's answer used once
        partners = [kl_partner(i, n) for i in range(n)]
        assert sorted(partners) == list(range(n)) and all(p != i for i, p in enumerate(partners))


def test_items_hold_the_answer_and_the_partners_answer_after_the_own_prompt(processor):
    data = prepare(KTO_DEMO, processor)
    ds = build_dataset(data, processor, media=DEMO_MEDIA, max_length=None, thinking=None)
    encoder = ChatEncoder(processor)
    n = len(ds)
    prompts = [json.dumps(s.messages) + json.dumps(s.images) + json.dumps(s.videos) for s in data.samples]
    for i, sample in enumerate(data.samples):
        item = ds[i]
        partner = data.samples[kl_partner(i, n)]
        assert prompts[kl_partner(i, n)] != prompts[i]  # the demo's KL answers are really mismatched
        enc = encoder.encode_preference(sample.messages, (*sample.completions, *partner.completions),
                                        data.image_specs[i], data.video_specs[i])
        assert item["record"] == i and item["label"] is sample.label
        assert item["prompt_ids"].tolist() == enc.prompt_ids
        assert item["completion_ids"].tolist() == enc.completion_ids[0]
        assert item["kl_ids"].tolist() == enc.completion_ids[1]
        assert item["completion_mask"].tolist() == enc.completion_masks[0]
        assert processor.tokenizer.decode(item["kl_ids"][item["kl_mask"] == 1]) == partner.completion + "<|im_end|>"


def test_batch_is_completion_rows_then_kl_rows_sharing_the_pictures(processor, tiny_model_dir):
    from vlft.models.loading import load_model

    data = prepare(KTO_DEMO, processor)
    ds = build_dataset(data, processor, media=DEMO_MEDIA, max_length=None, thinking=None)
    model, _ = load_model(str(tiny_model_dir))
    collate = build_collator(processor, model)
    assert isinstance(collate, KTOCollator)
    ids = [s.id for s in data.samples]
    picked = [ids.index(k) for k in ("image_good", "text_bad_2u1_flat", "video_good", "multi_image")]
    items = [ds[i] for i in picked]
    batch = collate(items)
    b = len(items)
    assert batch["input_ids"].shape[0] == 2 * b
    assert batch["item_index"].tolist() == picked and batch["label"].tolist() == [True, False, True, True]
    for row in range(2 * b):
        item, side = items[row % b], ("completion", "kl")[row // b]
        seq = torch.cat([item["prompt_ids"], item[f"{side}_ids"]])
        assert batch["input_ids"][row, :len(seq)].tolist() == seq.tolist()
        assert batch["attention_mask"][row].sum() == len(seq)
        learned = batch["labels"][row] != IGNORE_INDEX
        assert not learned[:len(item["prompt_ids"])].any()
        assert learned.sum() == item[f"{side}_mask"].sum()
    # three images (one, then two) and one video in the completion rows; the KL rows repeat them as copies
    assert batch["image_copy_of"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["video_copy_of"].tolist() == [0, 0]
    assert "pair_index" not in batch


# ------------------------------------------------------------------ balance
def test_balance_advice_follows_the_papers_rule():
    balanced = LabelBalance(5, 4)
    assert balanced.ratio == 1.25 and balanced.in_range and balanced.advice() is None
    few_good = LabelBalance(100, 400)  # ratio 0.25: raise the desirable weight to 4..5.33, or lower the other
    assert not few_good.in_range
    assert few_good.desirable_weights() == pytest.approx((4.0, 16 / 3))
    assert few_good.undesirable_weights() == pytest.approx((0.1875, 0.25))
    advice = few_good.advice()
    assert "--desirable_weight in [4, 5.33]" in advice and "--undesirable_weight in [0.188, 0.25]" in advice
    for weight in few_good.desirable_weights():
        assert LabelBalance(100, 400, desirable_weight=weight).in_range
    for weight in few_good.undesirable_weights():
        assert LabelBalance(100, 400, undesirable_weight=weight).in_range
    assert not LabelBalance(10, 5).in_range  # 2: too many desirable ones


def test_balance_of_the_demo_and_one_label_is_an_error(processor):
    data = prepare(KTO_DEMO, processor)
    balance = label_balance(data.samples)
    assert (balance.n_desirable, balance.n_undesirable) == (5, 4) and balance.in_range
    assert "5 desirable, 4 undesirable of 9 records" in balance.line()
    good = [s for s in data.samples if s.label]
    with pytest.raises(VlftError, match=r"thumbs\.json: all 5 usable records have label true.*label false"):
        label_balance(good, where="thumbs.json")


# ------------------------------------------------------------------ log-probs against a plain forward
def plain_sum(model, processor, encoder, messages, answer, images, videos) -> float:
    """Independent of vlft's encoder, dataset and collator: prompt + answer rendered by the processor's own chat
    template and tokenised by the processor's own call (with the frames vlft samples, as tests/data/
    test_video_sft.py does), one forward of that row alone, log_softmax summed over the tokens after the
    generation prompt up to and including the answer's <|im_end|>."""
    from transformers.video_utils import VideoMetadata

    from vlft.data.media import fit_image, load_image
    from vlft.data.video import load_video

    kwargs = dict(do_resize=False, return_tensors="pt")
    if images:
        factor = encoder.patch_size * encoder.merge_size
        kwargs["images"] = [fit_image(load_image(p), factor=factor, min_pixels=DEMO_MEDIA.image_min_pixels,
                                      max_pixels=DEMO_MEDIA.image_max_pixels) for p in images]
    if videos:
        clips = [load_video(v, **DEMO_MEDIA.video_kwargs(encoder)) for v in videos]
        kwargs.update(videos=[c.frames for c in clips], do_sample_frames=False, fps=clips[0].fps,
                      video_metadata=[VideoMetadata(fps=c.source_fps, frames_indices=c.indices,
                                                    total_num_frames=round(c.duration * c.source_fps)) for c in clips])
    text = processor.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)
    full = processor(text=[text], **kwargs)
    n = len(processor(text=[prompt], **kwargs)["input_ids"][0])
    ids = full["input_ids"][0]
    end = n + ids[n:].tolist().index(processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with torch.no_grad():
        logits = model(**full).logits[0].double()
    return logits[n - 1:end].log_softmax(-1).gather(-1, ids[n:end + 1, None]).sum().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_equal_plain_forwards_in_one_mixed_batch(family, tiny_model_factory):
    from vlft.models.loading import load_model, load_processor
    from vlft.train.core.model_inputs import model_inputs
    from vlft.train.preference.logprobs import completion_log_probs

    model_dir = str(tiny_model_factory(family))
    processor = load_processor(model_dir)
    model, fam = load_model(model_dir)
    model.double().eval()  # float64: the comparison checks which tokens are summed, not float32 rounding
    if fam.moe is not None:  # the grouped-matmul experts take no float64; the eager loop computes the same
        model.set_experts_implementation("eager")
    data = prepare(KTO_DEMO, processor)
    ds = build_dataset(data, processor, media=DEMO_MEDIA, max_length=None, thinking=None)
    kinds = {"image_good", "video_bad", "text_good_2u1_flat", "multi_image"}  # image, video, text, two images
    picked = [i for i, s in enumerate(data.samples) if s.id in kinds]
    assert len(picked) == len(kinds)
    batch = model_inputs(build_collator(processor, model)([ds[i] for i in picked]), model,
                         image_norm=ds.image_norm, video_norm=ds.video_norm)
    batch = {k: v for k, v in batch.items() if k not in ("label", "item_index")}
    with torch.no_grad():
        per_token, mask = completion_log_probs(model, batch, vision_once=True)
    answer, kl = (per_token * mask).sum(1).chunk(2)
    for k, i in enumerate(picked):
        sample, partner = data.samples[i], data.samples[kl_partner(i, len(ds))]
        for side, got, text in (("completion", answer[k], sample.completion), ("kl", kl[k], partner.completion)):
            want = plain_sum(model, processor, ds.encoder, sample.messages, text, data.image_paths[i],
                             data.video_sources[i])
            assert math.isclose(got.item(), want, rel_tol=0, abs_tol=1e-5), (family, sample.id, side, got, want)


def test_an_answer_the_template_cannot_render_is_named_by_the_kto_field():
    """A completion-level encoding problem names KTO's own field, `completion` (DPO's would be `chosen`)."""
    from vlft.data.encoding import EncodingError
    from vlft.data.kto import KTOSample
    from vlft.data.prepare import _encoding_field

    sample = KTOSample(index=0, id=None, messages=[{"role": "user", "content": "q"}], completion="a", label=True,
                       images=[])
    assert _encoding_field(EncodingError("x", completion=0), sample) == "completion"
    assert _encoding_field(EncodingError("x", completion=0), object()) == "chosen"  # a pair's first answer


def test_preview_and_check_data_show_a_kto_record_as_training_sees_it(tiny_model_dir, tmp_path, capsys):
    """preview --stage kto: the record's answer trains, the KL sequence (another record's answer) trains nothing;
    check-data --stage kto reports the label balance."""
    import re

    from vlft.check import main as check_main
    from vlft.preview import main as preview_main

    data = str(REPO / "data_examples" / "kto_demo.json")
    out = tmp_path / "kto.html"
    assert preview_main(["--stage", "kto", "--model_id", str(tiny_model_dir), "--data_path", data,
                         "--num_records", "3", "--output", str(out)]) == 0
    page = out.read_text()
    answers = re.findall(r'<h3>(?:un)?desirable \((\d+) tokens, (\d+) trained\)</h3>', page)
    labels = [bool(r["label"]) for r in json.loads((REPO / "data_examples" / "kto_demo.json").read_text())[:3]]
    assert re.findall(r'<h3>((?:un)?desirable) \(', page) == ["desirable" if x else "undesirable" for x in labels]
    kl = re.findall(r'<h3>kl_estimate \((\d+) tokens, (\d+) trained\)</h3>', page)
    assert len(answers) == len(kl) == 3
    assert all(int(trained) > 0 for _, trained in answers) and all(trained == "0" for _, trained in kl)
    assert check_main(["--stage", "kto", "--model_id", str(tiny_model_dir), "--data_path", data]) == 0
    records = json.loads((REPO / "data_examples" / "kto_demo.json").read_text())
    good = sum(bool(r["label"]) for r in records)
    assert f"labels: {good} desirable, {len(records) - good} undesirable of {len(records)} records" in \
        capsys.readouterr().err


def test_the_label_balance_is_counted_from_the_stored_flags_without_reading_a_record(tiny_model_dir):
    """Start-up at any data size: the DESIRABLE bit of data/store.py, set at preparation, gives the balance; no
    record's payload is unpickled for it (a samples view that refuses to be read still gives the counts)."""
    from types import SimpleNamespace

    from vlft.data.store import DESIRABLE
    from vlft.models.loading import load_processor

    prepared = prepare(KTO_DEMO, load_processor(str(tiny_model_dir)))
    labels = [bool(r["label"]) for r in json.loads(KTO_DEMO.read_text())]
    assert prepared.count_flag(DESIRABLE) == sum(labels) and 0 < sum(labels) < len(labels)
    assert [bool(int(f) & DESIRABLE) for f in prepared.flags] == labels

    class Unreadable:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            raise AssertionError("a record was read")

    view = SimpleNamespace(samples=Unreadable(), count_flag=prepared.count_flag)
    balance = label_balance(view)
    assert (balance.n_desirable, balance.n_undesirable) == (sum(labels), len(labels) - sum(labels))
    listed = label_balance(list(prepared.samples))  # a plain list of samples: counted from them
    assert (listed.n_desirable, listed.n_undesirable) == (balance.n_desirable, balance.n_undesirable)
