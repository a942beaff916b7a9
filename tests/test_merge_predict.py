"""Merge and predict: the merged checkpoint is a plain transformers model whose logits equal the adapter's,
every key is checked, nothing is half-written or overwritten; predict reproduces what the demo memorised."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, FAMILIES, rounding_sensitivity
from safetensors.torch import load_file, save_file

from vlft.errors import VlftError
from vlft.merge import load_adapted_model, merge
from vlft.predict import main as predict_main
from vlft.train.sft.run import run


def train_lora(model_dir, out, *extra):
    return run(["--model_id", str(model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                "--output_dir", str(out), "--lora_enable", "true", "--vision_lora", "true", "--lora_rank", "8",
                "--lora_alpha", "16", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
                "--disable_tqdm", "true", "--seed", "0", *extra])


def image_batch(model_dir):
    from vlft.data.collator import SFTCollator
    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import load_model, load_processor

    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES), media=DEMO_MEDIA,
                             max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    batch = SFTCollator.for_model(processor, load_model(str(model_dir))[0])([ds[i] for i in (0, 2, 7, 9)])
    batch.pop("labels")
    return batch


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory(request.param)
    out = tmp_path_factory.mktemp(f"lora-{request.param}") / "run"
    train_lora(model_dir, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    return request.param, model_dir, out


def test_merged_logits_equal_the_adapter(trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, model_dir, run_dir = trained
    merged_dir = merge(str(run_dir), str(tmp_path / "merged"), dtype="fp32")
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= names
    assert not names & {"adapter_config.json", "vlft_args.json", "non_lora_trainables.safetensors"}
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    AutoProcessor.from_pretrained(str(merged_dir))  # plain transformers loads the processor too
    assert merged.config.model_type == family
    adapted, _, _ = load_adapted_model(run_dir)
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = image_batch(model_dir)
    with torch.no_grad():
        want, got, untrained = adapted(**batch).logits, merged(**batch).logits, base(**batch).logits
    diff = (want - got).abs().max().item()
    # a merge rewrites the weights exactly up to fp32 rounding: 1e-4, or 4x what that rounding moves this model's
    # logits where more (the hybrid tiny Qwen3.5 models, ~2e-4)
    tolerance = max(1e-4, 4 * rounding_sensitivity(merged, batch))
    print(f"\n{family}: merged vs adapter max |logit diff| = {diff:.2e} (tolerance {tolerance:.1e}); merged vs base = "
          f"{(got - untrained).abs().max().item():.2e}")
    assert diff < tolerance
    assert (got - untrained).abs().max() > 1e-2  # the merge carried the training over


def test_checkpoint_dirs_merge_too(trained, tmp_path):
    _, _, run_dir = trained
    first = merge(str(run_dir / "checkpoint-2"), str(tmp_path / "step2"), dtype="fp32")
    final = merge(str(run_dir), str(tmp_path / "final"), dtype="fp32")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_merged_model_is_readable_by_a_server_running_as_another_user(trained, tmp_path):
    import os
    import stat

    _, _, run_dir = trained
    umask = os.umask(0o022)
    try:
        out = merge(str(run_dir), str(tmp_path / "served"), dtype="fp32")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()} == {0o644}


def test_strict_keys(trained, tmp_path):
    import shutil

    _, _, run_dir = trained
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = load_file(str(broken / "non_lora_trainables.safetensors"))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(broken / "non_lora_trainables.safetensors"))
    with pytest.raises(VlftError, match=f"missing .*{dropped.replace('.', '[.]')}"):
        merge(str(broken), str(tmp_path / "out"))
    save_file({**weights, "model.visual.extra.weight": torch.zeros(2)}, str(broken / "non_lora_trainables.safetensors"))
    with pytest.raises(VlftError, match="model.visual.extra.weight"):
        merge(str(broken), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".merging-" in p.name]  # nothing half-written left behind


def test_existing_output_is_never_overwritten(trained, tmp_path):
    _, _, run_dir = trained
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VlftError, match="--overwrite"):
        merge(str(run_dir), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge(str(run_dir), str(out), overwrite=True)
    assert (out / "model.safetensors").is_file()


def test_full_runs_are_not_merged(tiny_model_dir, tmp_path):
    with pytest.raises(VlftError, match="no adapter"):
        merge(str(tiny_model_dir), str(tmp_path / "x"))


def test_predict_reproduces_the_memorised_demo(tiny_model_dir, tmp_path):
    """The demo recipe (scripts/finetune_lora.sh) memorises data_examples; predict through the run dir, the
    merged dir and the base model exercises train -> save -> load -> generate end to end."""
    run_dir = tmp_path / "run"
    run(["--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
         "--output_dir", str(run_dir), "--lora_enable", "true", "--freeze_vision_tower", "true", "--lora_rank", "16",
         "--lora_alpha", "32", "--num_train_epochs", "30", "--per_device_train_batch_size", "2", "--learning_rate",
         "5e-3", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--save_strategy", "no",
         "--disable_tqdm", "true", "--seed", "0"])
    merged = merge(str(run_dir), str(tmp_path / "merged"))
    references = [t["value"] for r in json.loads(DEMO_DATA.read_text()) for t in r["conversations"][-1:]]
    for model in (run_dir, merged):
        out = tmp_path / f"{model.name}.jsonl"
        assert predict_main(["--model", str(model), "--data_path", str(DEMO_DATA), "--image_folder",
                             str(DEMO_IMAGES), "--output", str(out), "--batch_size", "4"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["reference"] for r in rows] == references
        assert [r["prediction"] for r in rows] == references
    out = tmp_path / "base.jsonl"
    predict_main(["--model", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                  "--output", str(out), "--max_new_tokens", "8"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and sum(r["prediction"] == r["reference"] for r in rows) == 0  # untrained: no match
    with pytest.raises(VlftError, match="already exists"):
        predict_main(["--model", str(merged), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                      "--output", str(out)])


def test_the_run_records_what_trained_and_merge_checks_against_it(trained, tmp_path):
    """vlft_trained.json names what trained when the run saved (LoRA modules on LLM and tower, the merger fully);
    a saved weight that the record says did not train stops the merge, naming it."""
    import shutil

    from vlft.models.loading import load_model
    from vlft.models.registry import get_family
    from vlft.run_dir import TRAINED_FILE, read_trained

    family, model_dir, run_dir = trained
    record = read_trained(run_dir)
    fam = get_family(family)
    assert record["non_lora"] and all(fam.part_of(n) == "merger" for n in record["non_lora"])
    merger = {n for n, _ in load_model(str(model_dir))[0].named_parameters() if fam.part_of(n) == "merger"}
    assert set(record["non_lora"]) == merger  # every merger weight, and nothing else, trained fully
    parts = {fam.part_of(m) for m in record["lora_modules"]}
    assert parts == {"llm", "vision"}
    assert read_trained(run_dir / "checkpoint-2") is not None  # every checkpoint carries it

    narrowed = tmp_path / "narrowed"
    shutil.copytree(run_dir, narrowed, ignore=shutil.ignore_patterns("checkpoint-*"))
    dropped = record["non_lora"][0]
    (narrowed / TRAINED_FILE).write_text(json.dumps({**record, "non_lora": record["non_lora"][1:]}))
    with pytest.raises(VlftError, match=f"did not train: {dropped.replace('.', '[.]')}"):
        merge(str(narrowed), str(tmp_path / "out"))


def test_predict_takes_media_flags_from_a_config_file_over_the_run(trained, tmp_path, monkeypatch):
    """Media settings a user gives in --config win over the run's saved ones, as on the command line; the
    others come from the run."""
    import vlft.predict

    _, _, run_dir = trained
    seen = {}
    monkeypatch.setattr(vlft.predict, "predict", lambda pred_args, data_args, *_: seen.setdefault("data", data_args))
    config = tmp_path / "predict.yaml"
    config.write_text("image_max_pixels: 4096\n")
    predict_main(["--model", str(run_dir), "--data_path", str(DEMO_DATA), "--output", str(tmp_path / "p.jsonl"),
                  "--config", str(config)])
    saved = json.loads((run_dir / "vlft_args.json").read_text())
    assert seen["data"].image_max_pixels == 4096 != saved["image_max_pixels"]
    assert seen["data"].image_min_pixels == saved["image_min_pixels"]


def test_qwen3_5_predict_reproduces_what_it_memorised(tiny_model_factory, tmp_path, capfd):
    """Qwen3.5's thinking template: a trained answer follows an empty think block, which the template's own
    generation prompt (`<think>\\n`, thinking on) leaves for the model to write. Trained with --enable_thinking false,
    the memorised answers (an image, a multi-turn and a text record) come back word for word through the run dir
    (predict takes the flag from the run) and the merged dir (merge records it in vlft_media.json), so predict asks
    for an answer where training put it; the untrained model (given the flag) reproduces none."""
    model_dir = tiny_model_factory("qwen3_5")
    records = {r["id"]: r for r in json.loads(DEMO_DATA.read_text())}
    chosen = [records[i] for i in ("single_image", "multi_turn_palette", "text_only")]
    data = tmp_path / "three.json"
    data.write_text(json.dumps(chosen))
    run_dir = tmp_path / "run"
    run(["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(DEMO_IMAGES),
         "--output_dir", str(run_dir), "--lora_enable", "true", "--freeze_vision_tower", "true", "--lora_rank", "16",
         "--lora_alpha", "32", "--num_train_epochs", "40", "--per_device_train_batch_size", "3", "--learning_rate",
         "5e-3", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", "--enable_thinking", "false"])
    started = capfd.readouterr().err  # start-up: the reasoning mix of a thinking model's data
    assert "reasoning (thinking chat template): 0 of 3 records train on reasoning in their answers, 3 on" in started
    assert "warning: 3 of 3 records (100%) train this thinking model on answers without reasoning" in started
    merged = merge(str(run_dir), str(tmp_path / "merged"))
    assert json.loads((merged / "vlft_media.json").read_text())["enable_thinking"] is False
    references = [r["conversations"][-1]["value"] for r in chosen]
    for model in (run_dir, merged, model_dir):
        out = tmp_path / f"{model.name}.jsonl"
        flag = ["--enable_thinking", "false"] if model == model_dir else []  # the base model records none
        assert predict_main(["--model", str(model), "--data_path", str(data), "--image_folder", str(DEMO_IMAGES),
                             "--output", str(out), "--batch_size", "3", "--max_new_tokens", "24", *flag]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["reference"] for r in rows] == references
        hits = [r["prediction"] == r["reference"] for r in rows]
        assert hits == ([False] * 3 if model == model_dir else [True] * 3), (model.name, rows)
