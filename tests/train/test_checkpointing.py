"""Gradient checkpointing with frozen and LoRA-adapted vision towers, on every family: vision LoRA gets
gradients, a frozen tower builds no autograd graph, nothing warns about inputs without requires_grad,
and the frozen-tower patch leaves loss and gradients unchanged."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEMO_IMAGES, DEMO_MEDIA, FAMILIES

from vlft.data.collator import SFTCollator
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset
from vlft.models.loading import load_model, load_processor
from vlft.models.patches import skip_frozen_vision_graph, uncheckpoint_frozen_blocks
from vlft.train.sft.run import run

NO_GRAD_WARNING = "None of the inputs have requires_grad"


def image_batch(model_dir, data):
    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(data), processor=processor, image_folder=str(DEMO_IMAGES),
                             media=DEMO_MEDIA, max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    model, _ = load_model(str(model_dir))
    return SFTCollator.for_model(processor, model)([ds[0], ds[2]])


def watch(model):
    """Record whether the last vision block's and the merger's outputs require grad."""
    seen = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual = base.model.visual

    def hook(key):
        def record(module, args, out):
            seen[key] = (out if torch.is_tensor(out) else out[0]).requires_grad
        return record

    handles = [visual.blocks[-1].register_forward_hook(hook("block")), visual.merger.register_forward_hook(hook("merger"))]
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("tower", ["frozen", "vision_lora"])
def test_checkpointing_with_frozen_or_lora_tower(family, reentrant, tower, tiny_model_factory, image_only_data, tmp_path):
    model_dir = tiny_model_factory(family)
    flags = ["--lora_enable", "true"] + (["--vision_lora", "true"] if tower == "vision_lora" else
                                         ["--freeze_vision_tower", "true"])
    argv = ["--model_id", str(model_dir), "--data_path", str(image_only_data), "--image_folder", str(DEMO_IMAGES),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--disable_tqdm", "true", "--gradient_checkpointing",
            "true", "--gradient_checkpointing_kwargs", f'{{"use_reentrant": {str(reentrant).lower()}}}', *flags]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = run(argv)
    assert not [w for w in caught if NO_GRAD_WARNING in str(w.message)]
    model = trainer.model
    if tower == "vision_lora":  # B starts at zero: it moved only if gradients reached the vision LoRA
        vision_b = [p for n, p in model.named_parameters() if "lora_B" in n and ".visual.blocks." in n]
        assert vision_b and all(p.abs().sum() > 0 for p in vision_b)

    # one more step by hand, in the state the Trainer left the model in (checkpointing still on)
    model.train()
    seen, handles = watch(model)
    batch = image_batch(model_dir, image_only_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**batch).loss.backward()
    for h in handles:
        h.remove()
    assert not [w for w in caught if NO_GRAD_WARNING in str(w.message)]
    assert seen["merger"] is True
    assert seen["block"] is (tower == "vision_lora")  # a frozen tower records no graph
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and ".visual.blocks." in n]
    if tower == "vision_lora":
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_tower_patch_changes_nothing_but_the_graph(family, tiny_model_factory, image_only_data):
    model_dir = tiny_model_factory(family)
    batch = image_batch(model_dir, image_only_data)
    results = []
    for patched in (False, True):
        model, fam = load_model(str(model_dir))
        for name, p in model.named_parameters():
            p.requires_grad_(fam.part_of(name) != "vision")
        if patched:
            assert skip_frozen_vision_graph(model, fam) == len(model.model.visual.blocks)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if patched:
            assert uncheckpoint_frozen_blocks(model) == len(model.model.visual.blocks)
        model.train()
        seen, _ = watch(model)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, seen["block"]))
    (loss0, grads0, graph0), (loss1, grads1, graph1) = results
    assert graph1 is False
    # transformers alone records the frozen tower's graph where it hooks patch_embed: Qwen2-VL and Qwen2.5-VL (not
    # the Qwen3-VL tower, which Qwen3-VL-MoE and Qwen3.5 share)
    assert graph0 is (family in ("qwen2_vl", "qwen2_5_vl"))
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-7, rtol=0), name


def test_patch_refuses_a_training_tower(tiny_model_dir):
    model, fam = load_model(str(tiny_model_dir))
    assert skip_frozen_vision_graph(model, fam) == 0  # everything trains: nothing to skip
