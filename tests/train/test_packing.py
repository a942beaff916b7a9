"""Packing changes nothing but speed: on every family, one step over the same records (images, videos,
text) gives the same loss and gradients packed as padded, in fp32."""
from __future__ import annotations

import pytest
from conftest import DEMO_MEDIA, FAMILIES, REPO, loss_and_grads

from vlft.data.collator import PackingCollator, SFTCollator
from vlft.data.packing import plan_packs
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset
from vlft.models.loading import load_model, load_processor
from vlft.train.core.model_inputs import model_inputs
from vlft.train.sft.run import run

VIDEO_DATA = REPO / "data_examples" / "llava_video_demo.json"


HYBRID_FAMILIES = ("qwen3_5", "qwen3_5_moe")  # Gated DeltaNet layers: models/patches/linear_attention.py


def demo_dataset(model_dir, data_path):
    """The processor, prepared records and dataset of `data_path` (media under data_examples/)."""
    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(data_path), processor=processor, image_folder=str(REPO / "data_examples"),
                               media=DEMO_MEDIA, max_seq_length=4096)
    return processor, checked, SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA,
                               video_sources=checked.video_sources)


def packed_and_padded(model, processor, ds, packs):
    """One step over every record of `ds`, padded (one row each) and packed into `packs` (lists of record
    indices) through what the trainer hands the model: ((padded loss, grads), (packed loss, grads))."""
    collator = SFTCollator.for_model(processor, model)
    padded = loss_and_grads(model, collator([ds[i] for i in range(len(ds))]))
    batch = PackingCollator(collator)([[ds[i] for i in pack] for pack in packs])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(packs)
    return padded, loss_and_grads(model, model_inputs(batch, model))


def assert_same_step(family, padded, packed, tolerance=1e-5):
    """Same loss and gradients within `tolerance`; for a gradient whose entries exceed 1 the tolerance is
    relative to its largest entry (fp32 sums over tokens taken in another order: the hybrid tiny models have
    gradients of ~40, whose last bit is ~4e-6)."""
    (padded_loss, padded_grads), (packed_loss, packed_grads) = padded, packed
    assert padded_grads.keys() == packed_grads.keys()
    worst = max(((padded_grads[n] - packed_grads[n]).abs().max().item(), padded_grads[n].abs().max().item(), n)
                for n in padded_grads)
    print(f"\n{family}: loss padded {padded_loss.item():.6f} packed {packed_loss.item():.6f}; "
          f"max |grad diff| {worst[0]:.2e} (largest entry {worst[1]:.3g}, {worst[2]})")
    assert abs(padded_loss - packed_loss) < tolerance
    for name, grad in padded_grads.items():
        assert (grad - packed_grads[name]).abs().max() <= tolerance * max(1.0, grad.abs().max().item()), name
    assert any(g.abs().max() > 0 for g in packed_grads.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded(family, tiny_model_factory):
    model_dir = tiny_model_factory(family)
    processor, checked, ds = demo_dataset(model_dir, VIDEO_DATA)
    model, _ = load_model(str(model_dir))
    model.train()
    packs = plan_packs(checked.lengths, 256)
    assert 1 < len(packs) < len(ds)  # several records share rows, and there is more than one row
    assert_same_step(family, *packed_and_padded(model, processor, ds, packs))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])  # Qwen3.5: the refusal is lifted, the trainer patches
def test_logged_loss_is_the_same_with_and_without_packing(family, tiny_model_factory, tmp_path):
    """What a user can check from outside: one step, lr 0, a batch that holds every record."""
    data = REPO / "data_examples" / "llava_demo.json"
    common = ["--model_id", str(tiny_model_factory(family)), "--data_path", str(data), "--image_folder",
              str(REPO / "data_examples" / "images"), "--max_steps", "1", "--learning_rate", "0",
              "--per_device_train_batch_size", "10", "--save_strategy", "no", "--disable_tqdm", "true",
              "--max_seq_length", "256"]
    plain, _ = run(common + ["--output_dir", str(tmp_path / "plain")])
    packed, trainer = run(common + ["--output_dir", str(tmp_path / "packed"), "--packing", "true"])
    assert len(trainer.train_dataset) < 10  # records really share rows
    assert abs(plain["first_loss"] - packed["first_loss"]) < 1e-5, (plain["first_loss"], packed["first_loss"])


def test_packing_trains_the_demo(tiny_model_dir, tmp_path):
    summary, _ = run(["--model_id", str(tiny_model_dir), "--data_path", str(VIDEO_DATA), "--image_folder",
                      str(REPO / "data_examples"), "--video_min_pixels", "1024", "--video_max_pixels", "4096",
                      "--video_max_total_pixels", "65536", "--packing", "true", "--max_seq_length", "512",
                      "--lora_enable", "true", "--vision_lora", "true", "--num_train_epochs", "3",
                      "--per_device_train_batch_size", "1", "--learning_rate", "5e-3", "--output_dir",
                      str(tmp_path / "o"), "--save_strategy", "no", "--disable_tqdm", "true"])
    assert summary["last_loss"] < summary["first_loss"]


def test_group_by_length_batches_similar_lengths(tiny_model_dir, processor, tmp_path):
    data = REPO / "data_examples" / "llava_demo.json"
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--data_path", str(data), "--image_folder",
                            str(REPO / "data_examples" / "images"), "--group_by_length", "true", "--max_steps", "2",
                            "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "o"),
                            "--save_strategy", "no", "--disable_tqdm", "true"])
    assert summary["steps"] == 2
    lengths = prepare_sft_data(str(data), processor=processor, image_folder=str(REPO / "data_examples" / "images"),
                             media=DEMO_MEDIA, max_seq_length=8192).lengths
    order = list(iter(trainer._get_train_sampler()))
    assert sorted(order) == list(range(10))
    # 10 records fit one megabatch: the order is by length, longest first, so batches hold similar lengths
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
