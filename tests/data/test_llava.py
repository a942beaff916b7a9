import pytest

from vlft.constants import RESERVED_STRINGS
from vlft.data.llava import Sample, parse_record

FILE = "train.json"


def turn(speaker, value):
    return {"from": speaker, "value": value}


def parse_ok(record, index=0):
    sample, problems = parse_record(record, index, FILE)
    assert problems == []
    return sample


def parse_bad(record, index=3):
    sample, problems = parse_record(record, index, FILE)
    assert sample is None and problems
    assert all(p.file == FILE and p.index == index and p.message and p.hint for p in problems)
    return problems


def fields(problems):
    return [p.field for p in problems]


def test_single_image_record():
    record = {
        "id": 7,
        "image": "coco/1.jpg",
        "conversations": [turn("human", "<image>\nWhat is this?"), turn("gpt", "A cat.")],
    }
    assert parse_ok(record, index=5) == Sample(
        index=5,
        id="7",
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A cat."},
        ],
        images=["coco/1.jpg"],
    )


def test_text_only_with_system_and_role_aliases():
    record = {
        "image": None,
        "conversations": [
            turn("system", "Be brief."),
            turn("user", "Hi"),
            turn("assistant", "Hello"),
            turn("human", "Bye"),
            turn("gpt", "Bye"),
        ],
    }
    sample = parse_ok(record)
    assert sample.id is None and sample.images == []
    assert sample.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
        {"role": "assistant", "content": "Bye"},
    ]


def test_tags_anywhere_split_text_in_order():
    record = {
        "image": ["a.png", "b.png", "c.png"],
        "conversations": [
            turn("human", "Compare <image> and<image>\n\nwhich is bigger?\n<image>"),
            turn("gpt", "The first."),
        ],
    }
    assert parse_ok(record).messages[0]["content"] == [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " and"},
        {"type": "image"},
        {"type": "text", "text": "\nwhich is bigger?\n"},  # only one newline after a tag is dropped
        {"type": "image"},
    ]


def test_images_across_turns_and_text_kept_verbatim():
    record = {
        "image": ["x/1.png", "  /abs/2.png"],
        "conversations": [
            turn("human", "<image>  look\t"),
            turn("gpt", " first answer \n"),
            turn("human", "and now <image>"),
            turn("gpt", "second"),
        ],
    }
    sample = parse_ok(record)
    assert sample.images == ["x/1.png", "  /abs/2.png"]
    assert sample.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "  look\t"}]
    assert sample.messages[1]["content"] == " first answer \n"
    assert sample.messages[2]["content"] == [{"type": "text", "text": "and now "}, {"type": "image"}]


def test_only_a_tag():
    sample = parse_ok({"image": "a.png", "conversations": [turn("human", "<image>"), turn("gpt", "ok")]})
    assert sample.messages[0]["content"] == [{"type": "image"}]


@pytest.mark.parametrize("record", [None, [], "text", 3])
def test_record_not_an_object(record):
    (problem,) = parse_bad(record)
    assert problem.field == "" and "not an object" in problem.message


@pytest.mark.parametrize("conversations", [None, [], "hi", {"from": "human"}])
def test_conversations_missing_or_empty(conversations):
    record = {"id": "r1"} if conversations is None else {"id": "r1", "conversations": conversations}
    (problem,) = parse_bad(record)
    assert problem.field == "conversations"
    assert problem.record_id == "r1"


def test_collects_every_problem_of_a_record():
    record = {
        "id": "bad",
        "image": ["a.png", ""],
        "video": 5,
        "conversations": [
            "not a turn",
            turn("robot", "hi"),
            turn("gpt", "   "),
            {"from": "human", "value": 5},
            {"value": "no speaker"},
        ],
    }
    problems = parse_bad(record)
    assert fields(problems) == [
        "image[1]",
        "video",
        "conversations[0]",
        "conversations[1].from",
        "conversations[2].value",
        "conversations[3].value",
        "conversations[4].from",
    ]
    assert all(p.record_id == "bad" for p in problems)
    assert "'video' is a int" in problems[1].message
    assert "robot" in problems[3].message and "human" in problems[3].hint
    assert "no 'from'" in problems[6].message


def test_system_turn_only_first():
    record = {"conversations": [turn("human", "a"), turn("system", "b"), turn("gpt", "c")]}
    (problem,) = parse_bad(record)
    assert problem.field == "conversations[1].from" and "first" in problem.message


def test_only_a_system_turn():
    (problem,) = parse_bad({"conversations": [turn("system", "b")]})
    assert problem.field == "conversations"


@pytest.mark.parametrize(
    "speakers, field",
    [
        (["gpt", "human"], "conversations[0].from"),
        (["system", "gpt", "human"], "conversations[1].from"),
        (["human", "human", "gpt"], "conversations[1].from"),
        (["human", "gpt", "gpt"], "conversations[2].from"),
    ],
)
def test_turns_must_alternate(speakers, field):
    (problem,) = parse_bad({"conversations": [turn(s, "x") for s in speakers]})
    assert problem.field == field and "alternate" in problem.hint


@pytest.mark.parametrize("speakers", [["human"], ["system", "human"], ["human", "gpt", "human"]])
def test_trailing_human_turn(speakers):
    (problem,) = parse_bad({"conversations": [turn(s, "x") for s in speakers]})
    assert problem.field == f"conversations[{len(speakers) - 1}]"
    assert "no answer" in problem.message


@pytest.mark.parametrize(
    "image, texts, counts",
    [
        ("a.png", ["no tag", "ok"], ("0 <image>", "1 image")),
        (None, ["<image>", "ok"], ("1 <image>", "0 image")),
        (["a.png"], ["<image><image>", "ok"], ("2 <image>", "1 image")),
        (["a.png", "b.png"], ["<image>", "ok", "q", "ok"], ("1 <image>", "2 image")),
    ],
)
def test_tag_count_must_match_images(image, texts, counts):
    speakers = ["human", "gpt"] * (len(texts) // 2)
    record = {"image": image, "conversations": [turn(s, t) for s, t in zip(speakers, texts, strict=True)]}
    (problem,) = parse_bad(record)
    assert problem.field == "image"
    assert all(c in problem.message for c in counts)
    assert "tag" in problem.hint and "path" in problem.hint


@pytest.mark.parametrize("speaker, index", [("system", 0), ("gpt", 1), ("gpt", 3)])
def test_image_tag_outside_human_turns(speaker, index):
    speakers = ["system", "human", "gpt"] if speaker == "system" else ["human", "gpt", "human", "gpt"]
    texts = ["x"] * len(speakers)
    texts[index] = "see <image>"
    record = {"image": "a.png", "conversations": [turn(s, t) for s, t in zip(speakers, texts, strict=True)]}
    problems = parse_bad(record)
    (tag_problem,) = [p for p in problems if p.field == f"conversations[{index}].value"]
    assert f"in a {speaker} turn" in tag_problem.message
    # the tag is not counted as a human-turn image, so the count check also fires
    assert "image" in fields(problems)


@pytest.mark.parametrize("image", ["", "   ", [], [""], ["a.png", 3], 5, {"path": "a.png"}])
def test_bad_image_field(image):
    record = {"image": image, "conversations": [turn("human", "<image>"), turn("gpt", "ok")]}
    problems = parse_bad(record)
    assert fields(problems)[0] in ("image", "image[0]", "image[1]")
    assert len(problems) == 1  # no tag-count complaint about a field already reported


@pytest.mark.parametrize("reserved", RESERVED_STRINGS)
def test_reserved_strings_rejected(reserved):
    record = {"conversations": [turn("human", "hi"), turn("gpt", f"bye{reserved}")]}
    (problem,) = parse_bad(record)
    assert problem.field == "conversations[1].value" and reserved in problem.message


def test_video_tag_without_a_video_is_reported():
    record = {"conversations": [turn("human", "<video>\nWhat happens?"), turn("gpt", "x")]}
    (problem,) = parse_bad(record)
    assert problem.field == "video"
    assert "1 <video> tag(s) in the human turns but 0 video path(s)" in problem.message


def test_video_tag_in_a_gpt_turn_is_reported():
    record = {"video": "a.mp4", "conversations": [turn("human", "<video> hi"), turn("gpt", "see <video>")]}
    problems = parse_bad(record)
    assert [p.field for p in problems] == ["conversations[1].value"]
    assert "videos can only be given in human turns" in problems[0].message


def test_mixed_record_keeps_images_and_videos_in_tag_order():
    record = {"image": ["a.png", "b.png"], "video": ["clip.mp4", ["f1.png", "f2.png"]],
              "conversations": [turn("human", "<video>\n<image>\nCompare."), turn("gpt", "Same."),
                                turn("human", "Now <image> and <video>"), turn("gpt", "Different.")]}
    sample = parse_ok(record)
    assert sample.images == ["a.png", "b.png"] and sample.videos == ["clip.mp4", ["f1.png", "f2.png"]]
    assert sample.messages[0]["content"] == [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    assert sample.messages[2]["content"] == [{"type": "text", "text": "Now "}, {"type": "image"},
                                            {"type": "text", "text": " and "}, {"type": "video"}]


def test_bad_frame_list_is_reported():
    record = {"video": [["f1.png", ""]], "conversations": [turn("human", "<video>"), turn("gpt", "x")]}
    (problem,) = parse_bad(record)
    assert problem.field == "video[0]" and "frame paths" in problem.message


def test_null_video_key_is_ignored():
    parse_ok({"video": None, "conversations": [turn("human", "q"), turn("gpt", "a")]})
