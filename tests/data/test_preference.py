"""Preference records (the DPO stage's format): both layouts, every defect named by file, record, id and field,
and data preparation measuring each answer's sequence as SFT would encode it."""
from __future__ import annotations

import json

import pytest
from conftest import REPO

from vlft.data.encoding import ChatEncoder
from vlft.data.llava import parse_record
from vlft.data.preference import parse_preference_record
from vlft.data.prepare import PREFERENCE, prepare_data, probe_image
from vlft.errors import DataError

DPO_DEMO = REPO / "data_examples" / "dpo_demo.json"
GOOD = {"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}],
        "chosen": "A cat.", "rejected": "A dog."}


def problems(record):
    sample, found = parse_preference_record(record, 3, "prefs.json")
    assert sample is None
    return {p.field: str(p) for p in found}


def test_llava_and_flat_layouts_give_the_same_sample():
    llava, found = parse_preference_record(GOOD, 0, "f")
    assert not found
    flat, found = parse_preference_record({"id": "g", "image": "a.png", "prompt": "<image>\nWhat is it?",
                                           "chosen": {"from": "gpt", "value": "A cat."}, "rejected": "A dog."}, 0, "f")
    assert not found and flat == llava
    assert llava.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (llava.chosen, llava.rejected, llava.images) == ("A cat.", "A dog.", ["a.png"])


@pytest.mark.parametrize("change,field,words", [
    ({"rejected": "A cat."}, "rejected", "the same as the chosen one"),
    ({"chosen": "  "}, "chosen", "the chosen answer is empty"),
    ({"rejected": None}, "rejected", "'rejected' is missing"),
    ({"chosen": ["A cat."]}, "chosen", "'chosen' is a list"),
    ({"chosen": {"from": "human", "value": "A cat."}}, "chosen.from", "speaker is 'human'"),
    ({"chosen": "A <image> cat."}, "chosen", "<image> in a gpt turn"),
    ({"image": ["a.png", "b.png"]}, "image", "1 <image> tag(s) in the human turns but 2 image path(s)"),
    ({"rejected_image": ["b.png", "c.png"]}, "rejected_image", "2 rejected_image path(s) for the prompt's 1 <image>"),
    ({"rejected_image": 7}, "rejected_image", "'rejected_image' is a int"),
    ({"rejected_image": "a.png", "rejected": None}, "rejected_image", "is the prompt's own media"),
    ({"rejected_video": "v.mp4"}, "rejected_video", "1 rejected_video path(s) for the prompt's 0 <video> tag(s)"),
    ({"rejected_video": [["f1.png", ""]]}, "rejected_video[0]", "expected a non-empty list of frame paths"),
    ({"rejected": None, "rejected_images": ["b.png"]}, "rejected_images", "did you mean 'rejected_image'"),
    ({"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
     "conversations[1]", "the prompt ends with a gpt turn"),
])
def test_each_defect_names_its_field(change, field, words):
    found = problems({**GOOD, **change})
    assert field in found, found
    assert words in found[field]
    assert found[field].startswith("prefs.json: record 3 (id 'g'), field ")


def test_image_side_pairs_repeat_the_chosen_answer_unless_rejected_is_given():
    sample, found = parse_preference_record({**GOOD, "rejected": None, "rejected_image": "b.png"}, 0, "f")
    assert not found
    assert (sample.chosen, sample.rejected) == ("A cat.", "A cat.")  # the same answer with the other picture
    assert sample.rejected_media == (["b.png"], []) and sample.images == ["a.png"]
    sample, found = parse_preference_record({**GOOD, "rejected_image": ["b.png"]}, 0, "f")
    assert not found and sample.rejected == "A dog." and sample.rejected_media == (["b.png"], [])
    # the prompt's own picture again is no image-side pair: an ordinary pair, and the same answers teach nothing
    sample, found = parse_preference_record({**GOOD, "rejected_image": "a.png"}, 0, "f")
    assert not found and sample.rejected_media is None
    assert "teaches nothing" in problems({**GOOD, "rejected": "A cat.", "rejected_image": "a.png"})["rejected_image"]
    # a video record replaces its video and keeps its image
    both = {"image": "a.png", "video": "v.mp4", "rejected_video": "w.mp4", "chosen": "Yes.",
            "conversations": [{"from": "human", "value": "<image><video>\nSame scene?"}]}
    sample, found = parse_preference_record(both, 0, "f")
    assert not found and sample.rejected_media == (["a.png"], ["w.mp4"]) and sample.rejected == "Yes."


def test_flat_layout_problems_name_the_prompt():
    found = problems({"id": "g", "prompt": "  ", "chosen": "a", "rejected": "b"})
    assert list(found) == ["prompt"] and "needs non-empty text" in found["prompt"]


def test_not_an_object():
    sample, found = parse_preference_record(["x"], 1, "f")
    assert sample is None and "not an object" in str(found[0])


def test_demo_prepares_and_each_length_is_the_sft_encoding(processor):
    from conftest import DEMO_MEDIA

    prepared = prepare_data(str(DPO_DEMO), PREFERENCE, processor=processor, image_folder=None, media=DEMO_MEDIA,
                            max_seq_length=8192)
    records = json.loads(DPO_DEMO.read_text())
    assert [s.id for s in prepared.samples] == [r["id"] for r in records]
    assert [len(s.images) for s in prepared.samples] == [1, 2, 0, 1, 0, 1]
    assert [len(s.videos) for s in prepared.samples] == [0, 0, 1, 0, 0, 0]
    assert [m is not None for m in prepared.rejected_media] == [False] * 5 + [True]
    encoder = ChatEncoder(processor)
    for sample, lengths, images, videos, other in zip(prepared.samples, prepared.sequence_lengths,
                                                      prepared.image_specs, prepared.video_specs,
                                                      prepared.rejected_media):
        # independent: the whole conversation (prompt + that answer) encoded the SFT way, with the pictures that
        # sequence shows (an image-side pair's rejected sequence: its own image, measured here from the file)
        shown = {"chosen": images, "rejected": images if other is None else
                 [probe_image(path, encoder, DEMO_MEDIA) for path in other[0]]}
        expected = tuple(len(encoder.encode_conversation(sample.messages + [{"role": "assistant", "content": answer}],
                                                         shown[side], videos).input_ids)
                         for side, answer in (("chosen", sample.chosen), ("rejected", sample.rejected)))
        assert lengths == expected
        if other is not None:  # the demo's two pictures differ in size: each sequence has its own vision tokens
            assert shown["chosen"][0].grid != shown["rejected"][0].grid and lengths[0] != lengths[1]
    assert prepared.lengths == [max(n) for n in prepared.sequence_lengths]


def test_a_pair_whose_longer_answer_does_not_fit_is_dropped(processor, tmp_path):
    from conftest import DEMO_MEDIA

    text = [r for r in json.loads(DPO_DEMO.read_text()) if r["id"] == "text_only_2u1_flat"][0]
    long = {**text, "id": "long", "rejected": "no " * 400}
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([text, long]))
    kwargs = dict(processor=processor, image_folder=None, media=DEMO_MEDIA, max_seq_length=64)
    prepared = prepare_data(str(path), PREFERENCE, **kwargs)
    assert [s.id for s in prepared.samples] == ["text_only_2u1_flat"] and [p.index for p in prepared.overlong] == [1]
    with pytest.raises(DataError, match="record 1 \\(id 'long'\\)"):
        prepare_data(str(path), PREFERENCE, reject_overlong=True, **kwargs)


def test_sft_records_are_not_preference_records():
    record = {"id": "s", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    assert parse_record(record, 0, "f")[0] is not None
    found = problems({**record, "id": "g"})
    assert "chosen" in found and "rejected" in found and "conversations[1]" in found


def test_check_data_cli_reads_the_dpo_demo(tiny_model_dir, capsys):
    from vlft.cli import main

    assert main(["check-data", "--stage", "dpo", "--model_id", str(tiny_model_dir), "--data_path", str(DPO_DEMO)]) == 0
    assert "dpo data: 6 of 6 records usable" in capsys.readouterr().err


def test_a_rejected_image_that_is_the_prompts_own_file_is_no_image_side_pair(processor, tmp_path):
    """The parser compares paths as written; data preparation compares the files they resolve to."""
    from conftest import DEMO_MEDIA

    record = [r for r in json.loads(DPO_DEMO.read_text()) if r["id"] == "image_side"][0]
    path = tmp_path / "prefs.json"
    same_file = "./" + record["image"]
    path.write_text(json.dumps([{**record, "rejected_image": same_file},  # the same answer too: teaches nothing
                                {**record, "id": "answers_differ", "rejected_image": same_file, "rejected": "No."}]))
    kwargs = dict(processor=processor, image_folder=str(DPO_DEMO.parent), media=DEMO_MEDIA, max_seq_length=8192)
    with pytest.raises(DataError) as err:
        prepare_data(str(path), PREFERENCE, **kwargs)
    (problem,) = err.value.problems
    assert (problem.index, problem.field) == (0, "rejected_image") and "teaches nothing" in str(problem)
    prepared = prepare_data(str(path), PREFERENCE, skip_bad_samples=True, **kwargs)
    # the other record is an ordinary pair: both sequences show the prompt's picture (and can share its encoding)
    assert [s.id for s in prepared.samples] == ["answers_differ"] and prepared.rejected_media == [None]
    assert prepared.samples[0].rejected_images is None


def test_a_missing_rejected_image_is_named_by_its_field(processor, tmp_path):
    from conftest import DEMO_MEDIA

    record = [r for r in json.loads(DPO_DEMO.read_text()) if r["id"] == "image_side"][0]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{**record, "rejected_image": "images/nowhere.png"}]))
    with pytest.raises(DataError) as err:
        prepare_data(str(path), PREFERENCE, processor=processor, image_folder=str(DPO_DEMO.parent), media=DEMO_MEDIA,
                     max_seq_length=8192)
    (problem,) = err.value.problems
    assert (problem.index, problem.field) == (0, "rejected_image[0]") and "nowhere.png" in str(problem)
    assert "--image_folder" in problem.hint


def test_a_kto_record_given_to_a_pair_stage_is_pointed_to_vlft_kto():
    sample, problems = parse_preference_record({"prompt": "Is it a cat?", "completion": "Yes.", "label": True},
                                               4, "thumbs.json")
    assert sample is None and [p.field for p in problems] == ["completion"]
    assert "KTO's layout" in problems[0].message and "`vlft kto`" in problems[0].hint
