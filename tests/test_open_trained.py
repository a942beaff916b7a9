"""models/loading.py `open_trained`: one function opens every kind of thing vlft writes (a base model, a full run and
its checkpoint, a LoRA run and its checkpoint, a merged model, a virtual-token run), says which kind it was, and gives
the logits of an independent loading of that kind: transformers' own from_pretrained for plain checkpoints, PEFT's
own from_pretrained (plus the fully trained weights saved next to the adapter) for LoRA and virtual-token runs. A
wrong path is a VlftError that names it and says what to do."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, rounding_sensitivity
from test_merge_predict import train_lora

from vlft.errors import VlftError
from vlft.merge import merge
from vlft.models.loading import (
    BASE,
    FULL_RUN,
    LORA_RUN,
    MERGED,
    VIRTUAL_TOKEN_RUN,
    describe_trained,
    load_model,
    open_trained,
)
from vlft.train.sft.run import run

V = 4  # virtual tokens


def common(model_dir, out, *extra):
    return run(["--model_id", str(model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                "--output_dir", str(out), "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
                "--seed", "0", *extra])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Every kind, on the tiny Qwen2-VL: {name: path}. The LoRA and the full run save a checkpoint-2 too."""
    root = tmp_path_factory.mktemp("open-trained")
    steps = ("--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2")
    train_lora(tiny_model_dir, root / "lora", *steps)  # LoRA on LLM and tower, the merger trained fully
    common(tiny_model_dir, root / "full", "--learning_rate", "1e-3", *steps)
    common(tiny_model_dir, root / "virtual", "--peft_type", "prompt_tuning", "--num_virtual_tokens", str(V),
           "--max_steps", "2", "--learning_rate", "3e-2", "--save_strategy", "no")
    merged = merge(str(root / "lora"), str(root / "merged"), dtype="fp32")
    return {"base": tiny_model_dir, "full": root / "full", "full/checkpoint-2": root / "full" / "checkpoint-2",
            "lora": root / "lora", "lora/checkpoint-2": root / "lora" / "checkpoint-2", "merged": merged,
            "virtual": root / "virtual"}


def batch_of(model_dir, ids):
    """Collated demo records (by id), labels dropped."""
    from vlft.data.collator import SFTCollator
    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import load_processor

    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES), media=DEMO_MEDIA,
                               max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    where = {s.id: i for i, s in enumerate(checked.samples)}
    batch = SFTCollator.for_model(processor, load_model(str(model_dir))[0])([ds[where[i]] for i in ids])
    batch.pop("labels")
    return batch


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    return batch_of(tiny_model_dir, ("single_image", "multi_image", "images_in_two_turns", "text_only"))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def plain(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()


def peft_lora(run_dir, base_dir):
    """PEFT's own loading of a LoRA run: the base, the fully trained weights copied in, PeftModel.from_pretrained."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base = plain(base_dir)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(run_dir / "non_lora_trainables.safetensors")).items():
            params[name].copy_(tensor)
    return PeftModel.from_pretrained(base, str(run_dir)).eval()


@pytest.mark.parametrize("name,kind,checkpoint", [("base", BASE, False), ("full", FULL_RUN, False),
                                                  ("full/checkpoint-2", FULL_RUN, True), ("merged", MERGED, False)])
def test_plain_checkpoints_open_as_transformers_loads_them(runs, batch, name, kind, checkpoint):
    path = runs[name]
    opened = open_trained(str(path))
    assert (opened.kind, opened.checkpoint, opened.processor_source) == (kind, checkpoint, str(path))
    assert opened.family.model_type == "qwen2_vl" and not opened.model.training
    assert opened.model.config.use_cache and opened.model.config.text_config.use_cache  # generation's setting
    saved = json.loads((path / "vlft_args.json").read_text()) if kind == FULL_RUN else {}
    assert opened.run_args == saved
    assert opened.base_model == (str(runs["base"]) if kind == FULL_RUN else None)
    if kind == MERGED:  # the media record merge wrote, for predict
        assert opened.media == json.loads((path / "vlft_media.json").read_text())
        trained_with = json.loads((runs["lora"] / "vlft_args.json").read_text())
        assert opened.media["image_max_pixels"] == trained_with["image_max_pixels"]
    else:
        assert opened.media == saved
    got, want = logits(opened.model, batch), logits(plain(path), batch)
    assert (got - want).abs().max() <= 1e-6
    if name != "base":  # training moved the model: opening the base instead would fail above
        assert (want - logits(plain(runs["base"]), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("name,checkpoint", [("lora", False), ("lora/checkpoint-2", True)])
def test_a_lora_run_and_its_checkpoint_open_as_peft_loads_them(runs, batch, name, checkpoint):
    """Unmerged: PEFT's own loading to 1e-6; merged (what predict generates with): to the rounding of a merge."""
    path = runs[name]
    unmerged = open_trained(str(path), merge_adapter=False)
    assert (unmerged.kind, unmerged.checkpoint) == (LORA_RUN, checkpoint)
    assert unmerged.base_model == str(runs["base"]) and unmerged.processor_source == str(path)
    assert unmerged.run_args == json.loads((path / "vlft_args.json").read_text()) == unmerged.media
    oracle = logits(peft_lora(path, runs["base"]), batch)
    assert (logits(unmerged.model, batch) - oracle).abs().max() <= 1e-6
    merged = open_trained(str(path)).model
    assert not hasattr(merged, "peft_config")  # the adapter folded into the weights
    assert merged.config.use_cache
    tolerance = max(1e-4, 4 * rounding_sensitivity(merged, batch))
    assert (logits(merged, batch) - oracle).abs().max() <= tolerance
    assert (oracle - logits(plain(runs["base"]), batch)).abs().max() > 1e-2  # the run moved the model


def test_checkpoints_of_a_run_differ(runs, batch):
    """checkpoint-2 and the final step-3 save are opened as themselves, not as the run directory."""
    final, step2 = open_trained(str(runs["lora"])).model, open_trained(str(runs["lora/checkpoint-2"])).model
    assert (logits(final, batch) - logits(step2, batch)).abs().max() > 1e-4


def test_a_virtual_token_run_opens_as_peft_loads_it(runs, tiny_model_dir):
    """PEFT's own forward prepends the virtual embeddings with plain 1-D positions, which for one text record with
    no padding are the positions vlft's VirtualTokenModel gives too (models/virtual_tokens.py): equal logits there."""
    from peft import PeftModel

    path = runs["virtual"]
    opened = open_trained(str(path))
    assert (opened.kind, opened.base_model, opened.checkpoint) == (VIRTUAL_TOKEN_RUN, str(tiny_model_dir), False)
    assert type(opened.model).__name__ == "VirtualTokenModel" and opened.model.get_base_model().config.use_cache
    text = batch_of(tiny_model_dir, ("text_only",))
    got = logits(opened.model, text)
    want = logits(PeftModel.from_pretrained(plain(tiny_model_dir), str(path)).eval(), text)
    assert got.shape == want.shape and got.shape[1] == text["input_ids"].shape[1] + V
    assert (got - want).abs().max() <= 1e-5
    assert (got[:, V:] - logits(plain(tiny_model_dir), text)).abs().max() > 1e-3  # the virtual tokens act


def test_describe_reads_no_weights_and_open_takes_its_answer(runs, monkeypatch):
    """describe_trained decides the kind from the small files; open_trained given that answer reads none of them
    again (predict describes --model once, before the data check, and opens it after)."""
    import vlft.models.loading as loading

    trained = describe_trained(str(runs["lora/checkpoint-2"]))
    assert (trained.kind, trained.checkpoint, trained.base_model) == (LORA_RUN, True, str(runs["base"]))
    monkeypatch.setattr(loading, "describe_trained", lambda *a, **k: pytest.fail("described twice"))
    assert open_trained(trained).kind == LORA_RUN
    with pytest.raises(ValueError, match="carries its base model"):
        open_trained(trained, base_model="other")


def test_the_reference_copy_keeps_the_cache_off(runs):
    """train/core/setup.py load_model_copy opens the starting model with use_cache=False, as the policy loads."""
    from types import SimpleNamespace

    from vlft.train.core.setup import load_model_copy

    copy = load_model_copy(SimpleNamespace(model_id=str(runs["full"]), attn_implementation="sdpa"),
                           SimpleNamespace(use_liger=False), SimpleNamespace(bf16=False))
    assert not copy.config.use_cache and not copy.config.text_config.use_cache
    assert all(torch.equal(p, q) for p, q in zip(copy.parameters(), plain(runs["full"]).parameters()))


def test_base_model_override_and_its_refusal(runs, tmp_path):
    """--base_model replaces an adapter run's recorded base; an adapter run that records none asks for it; on a
    model that holds all its weights it is refused rather than ignored."""
    assert describe_trained(str(runs["lora"]), base_model=str(runs["full"])).base_model == str(runs["full"])
    orphan = shutil.copytree(runs["virtual"], tmp_path / "orphan")
    (orphan / "vlft_args.json").unlink()
    with pytest.raises(VlftError, match="vlft_args.json is missing, so the base model is unknown: pass --base_model"):
        describe_trained(str(orphan))
    assert describe_trained(str(orphan), base_model=str(runs["base"])).base_model == str(runs["base"])
    with pytest.raises(VlftError, match=r"is a full fine-tuning run, .*leave it out"):
        describe_trained(str(runs["full"]), base_model=str(runs["base"]))


def test_wrong_paths_are_named_with_what_to_do(runs, tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(VlftError, match=f"{missing}.* does not exist; check the path"):
        open_trained(str(missing))
    weights = runs["full"] / "model.safetensors"
    with pytest.raises(VlftError, match="is a file; give the folder that holds the model"):
        open_trained(str(weights))
    unfinished = tmp_path / "unfinished"  # a run killed after its first checkpoint: only checkpoint-N inside
    shutil.copytree(runs["lora/checkpoint-2"], unfinished / "checkpoint-2")
    (unfinished / "checkpoint-10").mkdir()
    with pytest.raises(VlftError, match=f"holds no model .* its checkpoints, e.g. {unfinished}/checkpoint-10"):
        open_trained(str(unfinished))
    with pytest.raises(VlftError, match="holds no model .* give a run directory, a checkpoint-N"):
        open_trained(str(tmp_path))
    broken = shutil.copytree(runs["virtual"], tmp_path / "broken")
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2)}, str(broken / "adapter_model.safetensors"))
    with pytest.raises(VlftError, match="not the prompt_embeddings PEFT saves"):
        open_trained(str(broken))
