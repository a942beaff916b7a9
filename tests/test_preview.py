"""`vlft preview`: the page shows what trains (trained-token counts equal the dataset's labels, one block per vision
span, the media grids), lists the start-up check's problems, escapes record text, reads a run directory's settings;
and, in headless Chromium, the SFT, DPO and GRPO demo pages load without console errors with every record and
every image decoded.

The browser tests need Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`, which
.ci/run does) and selenium (the dev extras); they skip only where no browser is installed. To refresh the README's
screenshot: VLFT_PREVIEW_SCREENSHOT=docs/preview.png python -m pytest tests/test_preview.py -k screenshot
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from vlft.constants import IGNORE_INDEX
from vlft.errors import VlftError
from vlft.preview import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data_examples"
DEMO_IMAGES = EXAMPLES / "images"
SFT_RECORDS = json.loads((EXAMPLES / "llava_demo.json").read_text())
MISSING = {"id": "missing_image", "image": "no_such_picture.png",
           "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Nothing."}]}
HOSTILE = {"id": "<b>html</b>", "conversations": [
    {"from": "human", "value": "What does <script>document.title='pwned'</script> & <img src=x> do?"},
    {"from": "gpt", "value": "It is shown as text: <i>not italic</i>."}]}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """The SFT demo with a record whose image is missing (index 2) and one full of HTML (index 11)."""
    path = tmp_path_factory.mktemp("preview") / "sft.json"
    path.write_text(json.dumps([*SFT_RECORDS[:2], MISSING, *SFT_RECORDS[2:], HOSTILE]))
    return path


def preview(tmp_path: Path, model, data, *flags: str, name: str = "page.html") -> str:
    out = tmp_path / name
    assert main(["--model_id", str(model), "--data_path", str(data), "--output", str(out), *flags]) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def pages(tmp_path_factory, tiny_model_dir, sft_data) -> dict[str, Path]:
    """stage -> the written page of its demo (SFT: with the two extra records)."""
    out = tmp_path_factory.mktemp("pages")
    preview(out, tiny_model_dir, sft_data, "--image_folder", str(DEMO_IMAGES), name="sft.html")
    for stage in ("dpo", "grpo"):
        preview(out, tiny_model_dir, EXAMPLES / f"{stage}_demo.json", "--stage", stage, name=f"{stage}.html")
    return {stage: out / f"{stage}.html" for stage in ("sft", "dpo", "grpo")}


def sections(page: str) -> dict[str, str]:
    """record id (as written in the page) -> the HTML of its section."""
    found = re.findall(r'<section class="record[^"]*" id="record-\d+" data-index="\d+" data-id="([^"]*)">(.*?)</section>',
                       page, re.S)
    return dict(found)


def trained_spans(section: str) -> int:
    return len(re.findall(r'class="tok trained', section))


# --- what the page shows is what trains ------------------------------------------------------------------------


def test_trained_tokens_shown_equal_the_sft_labels(pages, processor, sft_data):
    from conftest import DEMO_MEDIA

    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset

    prepared = prepare_sft_data(str(sft_data), processor=processor, image_folder=str(DEMO_IMAGES), media=DEMO_MEDIA,
                                max_seq_length=8192, skip_bad_samples=True, workers=2)
    dataset = SFTDataset(prepared.samples, prepared.image_paths, processor, media=DEMO_MEDIA)
    shown = sections(pages["sft"].read_text())
    assert len(shown) == len(SFT_RECORDS) + 2
    for i, sample in enumerate(prepared.samples):
        item = dataset[i]
        section = shown[html.escape(sample.id)]
        expected = int((item["labels"] != IGNORE_INDEX).sum())
        assert trained_spans(section) == expected > 0, sample.id
        assert f'<b class="trained-count">{expected}</b>' in section
        assert f"<b>{len(item['input_ids'])}</b> tokens" in section
        grids = item.get("image_grid_thw")
        n_images = 0 if grids is None else len(grids)
        # one block per image, naming its pad count, never the pads themselves
        pads = [int(p) for p in re.findall(r'class="vision vision-image" data-tokens="\d+" data-pads="(\d+)"', section)]
        assert pads == ([] if grids is None else [int(g.prod()) // 4 for g in grids])
        assert len(re.findall(r'<img class="media-image"', section)) == n_images
    assert "&lt;|image_pad|&gt;</span>" not in pages["sft"].read_text()


def test_trained_tokens_shown_equal_the_dpo_masks(pages, processor):
    from vlft.data.dpo import PreferenceDataset, PreferenceFormat
    from vlft.data.prepare import MediaSettings, prepare_data

    media = MediaSettings(3136, 12845056, 100352, 602112, 6422528)  # the page's: Qwen2-VL's family defaults
    prepared = prepare_data(str(EXAMPLES / "dpo_demo.json"), PreferenceFormat(8192).record_format(),
                            processor=processor, image_folder=None, media=media, max_seq_length=8192, workers=2)
    dataset = PreferenceDataset(prepared.samples, prepared.image_paths, processor, media=media,
                                video_sources=prepared.video_sources, max_length=8192,
                                rejected_media=prepared.rejected_media)
    shown = sections(pages["dpo"].read_text())
    assert len(shown) == len(prepared.samples) == 6
    for i, sample in enumerate(prepared.samples):
        item = dataset[i]
        section = shown[sample.id]
        for side in ("chosen", "rejected"):
            part = re.search(rf'<div class="tokens part-{side}" data-trained="(\d+)"[^>]*>(.*?)</div>', section, re.S)
            assert int(part.group(1)) == trained_spans(part.group(2)) == int(item[f"{side}_mask"].sum()) > 0
        prompt = re.search(r'<div class="tokens part-prompt" data-trained="0"[^>]*>(.*?)</div>', section, re.S).group(1)
        assert trained_spans(prompt) == 0
        assert trained_spans(section) == int(item["chosen_mask"].sum() + item["rejected_mask"].sum())
        # an image-side pair: the rejected sequence's own prompt (its picture's pads) and its picture are shown
        other = re.search(r'<div class="tokens part-rejected-prompt" data-trained="0"[^>]*>(.*?)</div>', section, re.S)
        assert (other is not None) == ("rejected_prompt_ids" in item)
        images = re.findall(r'<img class="media-image"', section)
        assert len(images) == len(item.get("image_grid_thw", [])) + len(item.get("rejected_media", {}).get(
            "image_grid_thw", []))
        if other is not None:
            pads = re.findall(r'class="vision vision-image" data-tokens="\d+" data-pads="(\d+)"', other.group(1))
            assert [int(n) for n in pads] == [int(g.prod()) // 4 for g in item["rejected_media"]["image_grid_thw"]]
            assert "rejected sequence only" in section


def test_grpo_page_shows_prompts_and_their_columns(pages):
    page = pages["grpo"].read_text()
    shown = sections(page)
    assert len(shown) == 7
    assert sum(map(trained_spans, shown.values())) == 0  # a prompt trains nothing
    assert re.search(r'<th>solution</th><td>&quot;3&quot;</td>', shown["count_3"])
    assert len(re.findall(r'class="vision vision-video"', shown["video"])) == 1


def test_qwen3_5_grpo_page_shows_the_prompt_the_policy_gets(tmp_path, tiny_model_factory):
    """Qwen3.5 (thinking template): each prompt on the page is, token for token, the one the policy generates from
    (the dataset's prompt_ids, each vision span one block), ending, as the template's own generation prompt with
    thinking on (its default), inside an opened think block."""
    from vlft.data.grpo import PROMPT, PromptDataset
    from vlft.data.prepare import MediaSettings, prepare_data
    from vlft.models.families import get_family
    from vlft.models.loading import load_processor

    model = tiny_model_factory("qwen3_5")
    page = preview(tmp_path, model, EXAMPLES / "grpo_demo.json", "--stage", "grpo")
    processor = load_processor(str(model))
    media = MediaSettings(**get_family("qwen3_5").default_pixel_budgets())  # the page's: the family's defaults
    prepared = prepare_data(str(EXAMPLES / "grpo_demo.json"), PROMPT, processor=processor, image_folder=None,
                            media=media, max_seq_length=8192)
    dataset = PromptDataset(prepared.samples, prepared.image_paths, processor, media=media,
                            video_sources=prepared.video_sources)
    shown = sections(page)
    tok = processor.tokenizer
    think_end = tok.convert_tokens_to_ids("</think>")
    for i, sample in enumerate(prepared.samples):
        part = re.search(r'<div class="tokens part-prompt" data-trained="0"[^>]*>(.*?)</div>', shown[sample.id], re.S)
        pieces = re.findall(r'title="id (\d+)"|data-tokens="(\d+)"', part.group(1))  # a token, or a vision block
        ids = dataset[i]["prompt_ids"].tolist()
        at = 0
        for token, block in pieces:
            if token:
                assert int(token) == ids[at], (sample.id, at)
                at += 1
            else:
                at += int(block)
        assert at == len(ids)
        # thinking on, the template's default: the policy starts inside the opened think block, as Qwen3.5 generates
        assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n") and think_end not in ids


def test_bad_record_is_listed_with_its_problem(pages):
    page = pages["sft"].read_text()
    top = re.search(r'<section class="problems" id="problems">(.*?)</section>', page, re.S).group(1)
    assert "1 problem(s)" in top
    assert "record 2 (id &#x27;missing_image&#x27;), field &#x27;image[0]&#x27;" in top
    assert "no_such_picture.png does not exist" in top
    bad = sections(page)["missing_image"]
    assert "left out of training by the start-up check" in bad and "does not exist" in bad
    assert "tok trained" not in bad  # not encoded: it does not train
    assert page.count('class="record bad"') == 1


def test_record_text_is_escaped_and_the_page_is_self_contained(pages):
    page = pages["sft"].read_text()
    assert "<script" not in page.lower() and "<i>not italic</i>" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;" in page or "&lt;" in page
    assert 'data-id="&lt;b&gt;html&lt;/b&gt;"' in page
    for stage, path in pages.items():
        text = path.read_text()
        assert not re.findall(r'(?:src|href)="(?!data:)', text), stage  # every picture embedded, nothing linked
        assert "http://" not in text and "https://" not in text, stage


def test_run_directory_brings_its_model_and_media_settings(tmp_path, tiny_model_dir, processor):
    from PIL import Image

    from vlft.data.media import image_token_count

    run = tmp_path / "run"
    run.mkdir()
    # a run trained at a quarter of the tiny model's default image tokens, from the tiny model; no processor in it
    (run / "vlft_args.json").write_text(json.dumps({"model_id": str(tiny_model_dir), "image_min_pixels": 256,
                                                    "image_max_pixels": 1024, "max_seq_length": 4096}))
    page = preview(tmp_path, run, EXAMPLES / "llava_demo.json", "--image_folder", str(DEMO_IMAGES),
                   "--ids", "single_image,multi_image")
    assert list(sections(page)) == ["single_image", "multi_image"]
    sizes = [Image.open(DEMO_IMAGES / name).size for name in ("red_square.png", "red_square.png", "green_circle.png")]
    ip = processor.image_processor
    expected = [image_token_count(h, w, patch_size=ip.patch_size, merge_size=ip.merge_size, min_pixels=256,
                                  max_pixels=1024) for w, h in sizes]
    assert [int(n) for n in re.findall(r'data-pads="(\d+)"', page)] == expected and max(expected) < 16
    assert "image_max_pixels 1024" in page and "--max_seq_length 4096" in page
    # a flag given here wins over the run's record (the run's --image_min_pixels still holds)
    page = preview(tmp_path, run, EXAMPLES / "llava_demo.json", "--image_folder", str(DEMO_IMAGES),
                   "--ids", "single_image", "--image_max_pixels", "12845056")
    w, h = sizes[0]
    assert re.findall(r'data-pads="(\d+)"', page) == [str(image_token_count(
        h, w, patch_size=ip.patch_size, merge_size=ip.merge_size, min_pixels=256, max_pixels=12845056))]
    assert "image_max_pixels 12845056" in page


def test_record_choice(tmp_path, tiny_model_dir, sft_data):
    page = preview(tmp_path, tiny_model_dir, sft_data, "--image_folder", str(DEMO_IMAGES), "--num_records", "2")
    assert list(sections(page)) == ["single_image", "tag_after_text_rgba"]
    assert 'class="problems"' not in page
    # only bad records chosen: the page still lists them
    page = preview(tmp_path, tiny_model_dir, sft_data, "--image_folder", str(DEMO_IMAGES), "--ids", "missing_image")
    assert list(sections(page)) == ["missing_image"] and "does not exist" in page
    # over the length limit: dropped by the check, so listed, with the flag that set the limit
    page = preview(tmp_path, tiny_model_dir, sft_data, "--image_folder", str(DEMO_IMAGES), "--num_records", "1",
                   "--max_seq_length", "50")
    assert list(sections(page)) == ["single_image"] and "60 tokens (vision tokens included) &gt; --max_seq_length 50" in page
    with pytest.raises(VlftError, match="--ids: no record with id 'nope'"):
        preview(tmp_path, tiny_model_dir, sft_data, "--image_folder", str(DEMO_IMAGES), "--ids", "single_image,nope")
    with pytest.raises(VlftError, match="--ids and --num_records"):
        preview(tmp_path, tiny_model_dir, sft_data, "--ids", "a", "--num_records", "3")
    with pytest.raises(VlftError, match="--output .* is the data file"):
        main(["--model_id", str(tiny_model_dir), "--data_path", str(sft_data), "--output", str(sft_data)])


def test_token_text_keeps_characters_split_over_tokens(processor):
    from vlft.preview import TokenText, token_html

    ids = processor.tokenizer("héllo ✓ wörld", add_special_tokens=False)["input_ids"]
    spans, counts = token_html(ids, [IGNORE_INDEX, *ids[1:]], TokenText(processor.tokenizer))
    shown = "".join(re.findall(r'<span class="tok [^"]*" title="id \d+">(.*?)</span>', spans, re.S))
    assert shown == "héllo ✓ wörld"
    assert counts == {"tokens": len(ids), "trained": len(ids) - 1, "vision": 0, "reasoning": 0, "trained_reasoning": 0}


# --- a thinking model: reasoning tokens apart from answer tokens ---------------------------------------------------

REASONING_RECORDS = [
    {"id": "inline", "conversations": [{"from": "human", "value": "2+2?"},
                                       {"from": "gpt", "value": "<think>\nadd them\n</think>\n\n4"}]},
    {"id": "plain", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"id": "multi", "conversations": [{"from": "human", "value": "1+1?"},
                                      {"from": "gpt", "value": "2", "reasoning_content": "one and one"},
                                      {"from": "human", "value": "and 2+2?"},
                                      {"from": "gpt", "value": "4", "reasoning_content": "two twice"}]},
]


@pytest.fixture(scope="module")
def thinking_page(tmp_path_factory, tiny_model_factory) -> tuple[Path, Path, Path]:
    """(page, data, model): the records above previewed with a tiny Qwen3.5 (TRL's qwen3_5_think template)."""
    out = tmp_path_factory.mktemp("thinking")
    data = out / "reasoning.json"
    data.write_text(json.dumps(REASONING_RECORDS))
    model = tiny_model_factory("qwen3_5")
    preview(out, model, data, name="thinking.html")
    return out / "thinking.html", data, model


def reasoning_oracle(data: Path, model: Path) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """record id -> (ids, labels, parts) as training builds them (SFTDataset) and ChatEncoder marks them."""
    from conftest import DEMO_MEDIA

    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import load_processor

    processor = load_processor(str(model))
    prepared = prepare_sft_data(str(data), processor=processor, image_folder=None, media=DEMO_MEDIA,
                                max_seq_length=8192, workers=1)
    dataset = SFTDataset(prepared.samples, prepared.image_paths, processor, media=DEMO_MEDIA)
    out = {}
    for i, sample in enumerate(prepared.samples):
        item = dataset[i]
        parts = dataset.encoder.encode(sample.messages, parts=True).parts
        out[sample.id] = (item["input_ids"].tolist(), item["labels"].tolist(), parts)
    return out


def test_reasoning_tokens_are_marked_apart_from_the_answer(thinking_page):
    from vlft.data.encoding import ANSWER, REASONING
    from vlft.models.loading import load_processor

    page, data, model = thinking_page
    text = page.read_text()
    assert 'class="tok trained reasoning">reasoning, trained' in text  # the legend's entry
    tok = load_processor(str(model)).tokenizer
    shown = sections(text)
    for record_id, (ids, labels, parts) in reasoning_oracle(data, model).items():
        section = shown[record_id]
        spans = re.findall(r'<span class="tok (trained|masked)( reasoning| answer)?( special)?" title="id (\d+)">',
                           section)
        assert [int(s[3]) for s in spans] == ids  # no vision here: one span per token
        trained = sum(lab != IGNORE_INDEX for lab in labels)
        assert trained_spans(section) == trained > 0
        assert f'<b class="trained-count">{trained}</b>' in section
        assert [s[1].strip() for s in spans] == [{REASONING: "reasoning", ANSWER: "answer"}.get(k, "") for k in parts]
        trained_reasoning = [ids[i] for i, s in enumerate(spans) if s[:2] == ("trained", " reasoning")]
        assert f'<b class="reasoning-count">{len(trained_reasoning)}</b> of them reasoning' in section
        masked_reasoning = [ids[i] for i, s in enumerate(spans) if s[:2] == ("masked", " reasoning")]
        # closed forms: the think block Qwen3.5's template writes, learned when it holds reasoning, context when empty
        if record_id == "inline":
            assert tok.decode(trained_reasoning) == "<think>\nadd them\n</think>\n\n" and not masked_reasoning
        elif record_id == "plain":
            assert not trained_reasoning and tok.decode(masked_reasoning) == "<think>\n\n</think>\n\n"
        else:  # the first answer's reasoning is dropped by the template (before the last user message)
            assert tok.decode(trained_reasoning) == "<think>\ntwo twice\n</think>\n\n" and not masked_reasoning
            assert "one and one" not in section


def test_a_page_without_reasoning_has_no_reasoning_marks(pages):
    page = pages["sft"].read_text()
    assert " reasoning" not in "".join(re.findall(r'class="([^"]*)"', page)) and "reasoning-count" not in page


# --- in a real browser ------------------------------------------------------------------------------------------


def _browser_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser")), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _browser_paths()
    if not (chromium and chromedriver):
        pytest.skip("no headless browser installed (apt-get install chromium chromium-driver): the page is not "
                    "checked in a browser here")
    from selenium import webdriver  # the dev extras
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="vlft-chromium-")
    # no background connection of any kind: this machine's closed network refuses them, and the page needs none
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def load(browser, path: Path) -> list[dict]:
    """Open the page; the browser console's messages while it loaded."""
    browser.get_log("browser")  # drop what an earlier page left
    browser.get(path.resolve().as_uri())
    assert browser.title.startswith("vlft preview")
    return browser.get_log("browser")


def images_decoded(browser, css: str) -> list[int]:
    return [int(img.get_property("naturalWidth")) for img in browser.find_elements("css selector", css)]


@pytest.mark.parametrize("stage, records, images, videos", [
    ("sft", len(SFT_RECORDS) + 2, sum(len(r["image"]) if isinstance(r["image"], list) else 1
                                      for r in SFT_RECORDS if "image" in r), 0),
    ("dpo", 6, 6, 1),  # the image-side pair shows its rejected picture too
    ("grpo", 7, 6, 1),
])
def test_page_in_browser(browser, pages, stage, records, images, videos):
    console = load(browser, pages[stage])
    assert not [m for m in console if m["level"] in ("SEVERE", "WARNING")], console
    find = lambda css: browser.find_elements("css selector", css)  # noqa: E731
    assert len(find("section.record")) == records
    widths = images_decoded(browser, "img.media-image")
    assert len(widths) == images and all(w > 0 for w in widths)
    assert len(find("figure.thumb-video")) == videos
    frames = images_decoded(browser, "img.media-frame")
    assert (videos == 0) == (not frames) and all(w > 0 for w in frames) and len(frames) <= 4 * videos
    assert bool(find("section.record span.tok.trained")) == (stage != "grpo")
    assert all(block.is_displayed() for block in find("span.vision"))
    if stage == "sft":  # the bad record, shown in the top box and on its own section
        assert len(find("#problems li.problem")) == 1
        bad = find("section.record.bad")
        assert len(bad) == 1 and "missing_image" in bad[0].text and "does not exist" in bad[0].text
        assert browser.title == "vlft preview: sft.json"  # the record's <script> did not run


@pytest.mark.skipif(not os.environ.get("VLFT_PREVIEW_SCREENSHOT"), reason="set VLFT_PREVIEW_SCREENSHOT=docs/preview.png "
                                                                          "to refresh the README's screenshot")
def test_screenshot_of_the_sft_demo(browser, tmp_path, tiny_model_dir, monkeypatch):
    target = Path(os.environ["VLFT_PREVIEW_SCREENSHOT"]).resolve()
    # the page names the model and the data as the README's command does
    (tmp_path / ".cache" / "vlft").mkdir(parents=True)
    (tmp_path / ".cache" / "vlft" / "tiny-qwen2_vl").symlink_to(tiny_model_dir)
    (tmp_path / "data_examples").symlink_to(EXAMPLES)
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "preview.html"
    preview(tmp_path, ".cache/vlft/tiny-qwen2_vl", "data_examples/llava_demo.json", "--image_folder",
            "data_examples/images", name=page.name)
    browser.set_window_size(1100, 1000)
    load(browser, page)
    assert browser.save_screenshot(str(target))
    assert target.stat().st_size < 300_000


def test_reasoning_in_browser(browser, thinking_page):
    """The reasoning tokens are shown in their own colour, apart from the answer's, and each record's trained count
    on the page equals the labels != -100 of the sequence training builds."""
    page, data, model = thinking_page
    console = load(browser, page)
    assert not [m for m in console if m["level"] in ("SEVERE", "WARNING")], console
    colour = lambda el: el.value_of_css_property("background-color")  # noqa: E731
    oracle = reasoning_oracle(data, model)
    for section in browser.find_elements("css selector", "section.record"):
        ids, labels, _ = oracle[section.get_attribute("data-id")]
        trained = sum(lab != IGNORE_INDEX for lab in labels)
        assert int(section.find_element("css selector", "b.trained-count").text) == trained
        assert len(section.find_elements("css selector", "span.tok.trained")) == trained
    inline = browser.find_element("css selector", 'section.record[data-id="inline"]')
    reasoning = inline.find_elements("css selector", "span.tok.trained.reasoning")
    answer = inline.find_elements("css selector", "span.tok.trained.answer")
    assert reasoning and answer and all(el.is_displayed() for el in reasoning)
    assert {colour(el) for el in reasoning}.isdisjoint({colour(el) for el in answer})
    assert len({colour(el) for el in reasoning}) == 1
    assert int(inline.find_element("css selector", "b.reasoning-count").text) == len(reasoning)
    legend = browser.find_element("css selector", ".legend .tok.trained.reasoning")
    assert colour(legend) == colour(reasoning[0]) and "reasoning" in legend.text
