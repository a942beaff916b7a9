"""Collator shapes, padding and masks; and padding leaves the loss unchanged."""
from __future__ import annotations

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA

from vlft.constants import IGNORE_INDEX
from vlft.data.collator import SFTCollator
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset


@pytest.fixture(scope="module")
def dataset(processor):
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES),
                             media=DEMO_MEDIA, max_seq_length=4096)
    return SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)


@pytest.fixture(scope="module")
def collator(processor):
    tok = processor.tokenizer
    return SFTCollator(tok.pad_token_id, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                       video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"), mm_token_type_ids=True)


def test_mixed_batch_shapes_and_padding(dataset, collator, processor):
    items = [dataset[8], dataset[2], dataset[0]]  # text-only, two images, one image
    batch = collator(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pad = processor.tokenizer.pad_token_id
    for row, (it, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert torch.equal(batch["labels"][row, :n], it["labels"])
        assert (batch["input_ids"][row, n:] == pad).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    # vision tensors in batch order, text-only record contributing nothing
    assert torch.equal(batch["pixel_values"], torch.cat([dataset[2]["pixel_values"], dataset[0]["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([dataset[2]["image_grid_thw"], dataset[0]["image_grid_thw"]]))
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_pads = int((batch["input_ids"] == image_pad).sum())
    assert n_pads == int((batch["image_grid_thw"].prod(-1) // 4).sum())
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_pad).long())


def test_text_only_batch_has_no_vision_keys(dataset, collator):
    batch = collator([dataset[8], dataset[9]])
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert int(batch["mm_token_type_ids"].sum()) == 0


def test_pad_to_multiple_of(dataset, processor):
    tok = processor.tokenizer
    batch = SFTCollator(tok.pad_token_id, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"), pad_to_multiple_of=64)(
        [dataset[0], dataset[8]])
    assert batch["input_ids"].shape[1] % 64 == 0
    assert "mm_token_type_ids" not in batch  # only when the model's forward takes it


def test_padded_batch_loss_equals_token_weighted_per_record_loss(dataset, collator, tiny_model_dir):
    """Right padding must not change the loss: the batch loss is the token-weighted mean of the
    losses of each record alone (fp32, same weights)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    items = [dataset[i] for i in (8, 2, 3, 0)]
    with torch.no_grad():
        batch_loss = model(**collator(items)).loss
        total, n_tokens = 0.0, 0
        for it in items:
            n = int((it["labels"][1:] != IGNORE_INDEX).sum())  # labels are shifted inside the model
            total += model(**collator([it])).loss * n
            n_tokens += n
    assert torch.allclose(batch_loss, total / n_tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_dummy_media_leaves_the_loss_and_gradients_unchanged(family, tiny_model_factory):
    """The masked one-token image and video that distributed runs add to media-less batches change nothing."""
    from transformers import AutoModelForImageTextToText

    from vlft.data.collator import SFTCollator
    from vlft.models.loading import load_processor
    from vlft.models.registry import get_family

    model_dir = tiny_model_factory(family)
    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES),
                             media=DEMO_MEDIA, max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).train()
    items = [ds[8], ds[9]]  # text only: both a dummy image and a dummy video are added
    results = []
    for distributed in (False, True):
        batch = SFTCollator.for_model(processor, model, family=get_family(family), distributed=distributed)(items)
        assert ("pixel_values" in batch) is distributed and ("pixel_values_videos" in batch) is distributed
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain, g0), (dummy, g1) = results
    assert torch.allclose(plain, dummy, atol=1e-6, rtol=0)
    vision = [n for n in g1 if n.startswith("model.visual.")]
    assert vision and not any(n.startswith("model.visual.") for n in g0)  # the tower ran, with zero gradient
    assert all(g1[n].abs().max() == 0 for n in vision)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=0), name
