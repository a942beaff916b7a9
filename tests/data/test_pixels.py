"""uint8 patch rows (data/pixels.py) against the processors they stand in for, and the on-device
normalisation (train/core/model_inputs.py: model_inputs) against the processor's float path: the
values, the loss and the gradients must be the same, bit for bit where the arithmetic is the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEMO_MEDIA, FAMILIES, REPO, loss_and_grads
from PIL import Image

from vlft.data.collator import SFTCollator
from vlft.data.media import smart_size
from vlft.data.pixels import PixelNorm, image_to_tensor, patchify, resize
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset
from vlft.models.loading import load_model, load_processor
from vlft.train.core.model_inputs import model_inputs

VIDEO_DATA = REPO / "data_examples" / "llava_video_demo.json"


@pytest.fixture(scope="module", params=FAMILIES)
def family_processor(request, tiny_model_factory):
    return request.param, load_processor(str(tiny_model_factory(request.param)))


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: a resize that is off by one tap or one rounding shows up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("width, height", [(64, 48), (97, 131), (300, 40), (33, 33), (512, 384)])
def test_image_rows_equal_the_processor(family_processor, width, height):
    """The processor resizes the raw image itself here: same size rule, same kernel, same layout, same values."""
    _, processor = family_processor
    ip = processor.image_processor
    img = photo(width, height, seed=width * height)
    h, w = smart_size(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                      max_pixels=ip.size["longest_edge"])
    rows, grid = patchify(resize(image_to_tensor(img), h, w)[None], patch_size=ip.patch_size,
                          merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size)
    ref = ip(images=[img], return_tensors="pt")
    assert rows.dtype == torch.uint8
    assert ref["image_grid_thw"].tolist() == [[1, h // ip.patch_size, w // ip.patch_size]] == [list(grid)]
    assert torch.equal(PixelNorm.of(ip)(rows), ref["pixel_values"])


@pytest.mark.parametrize("frames", [1, 2, 3, 6])
def test_video_rows_equal_the_processor(family_processor, frames):
    """Odd frame counts are padded with the last frame, as the processors do."""
    _, processor = family_processor
    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    clip = np.random.default_rng(frames).integers(0, 256, (frames, 2 * factor, 3 * factor, 3), dtype=np.uint8)
    rows, grid = patchify(torch.from_numpy(clip).permute(0, 3, 1, 2), patch_size=vp.patch_size,
                          merge_size=vp.merge_size, temporal_patch_size=vp.temporal_patch_size)
    ref = vp(videos=[clip], do_sample_frames=False, do_resize=False, return_tensors="pt")
    assert rows.shape == ref["pixel_values_videos"].shape
    assert ref["video_grid_thw"].tolist() == [list(grid)]
    assert torch.equal(PixelNorm.of(vp)(rows), ref["pixel_values_videos"])


@pytest.mark.parametrize("patch_size", [2, 3, 14])
def test_pair_copy_equals_plain_copy(patch_size):
    """uint8 rows are gathered as int16 pixel pairs when the patch width is even; floats take the plain path."""
    frames = torch.randint(0, 256, (3, 3, patch_size * 4, patch_size * 6), dtype=torch.uint8)
    kwargs = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    fast, grid = patchify(frames, **kwargs)
    plain, plain_grid = patchify(frames.float(), **kwargs)
    assert fast.dtype == torch.uint8 and torch.equal(fast.float(), plain)
    assert grid == plain_grid == (2, 4, 6)  # 3 frames padded to 4
    channels_last = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as image_to_tensor gives
    assert torch.equal(patchify(channels_last, **kwargs)[0], fast)


def test_patchify_rejects_unfitted_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(torch.zeros(1, 3, 30, 28, dtype=torch.uint8), patch_size=14, merge_size=2, temporal_patch_size=2)


def test_pixel_norm_follows_the_processor_switches():
    rows = torch.tensor([[0, 255, 128, 64, 1, 2]], dtype=torch.uint8)  # 3 channels of 2 values
    both = PixelNorm(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))(rows)
    assert torch.allclose(both, torch.tensor([[-1.0, 1.0, 128 / 255 / 0.25 - 1, 64 / 255 / 0.25 - 1, 1 / 255, 2 / 255]]))
    assert torch.equal(PixelNorm(mean=(0.5,) * 3, std=(0.5,) * 3, do_normalize=False)(rows), rows.float() / 255)
    assert torch.equal(PixelNorm(mean=(0.5,) * 3, std=(0.5,) * 3, do_normalize=False, do_rescale=False)(rows),
                       rows.float())


@pytest.mark.parametrize("family", FAMILIES)
def test_uint8_batch_trains_exactly_like_the_float_batch(family, tiny_model_factory):
    """Images and videos in one batch: the raw dataset + on-device normalisation gives the loss and gradients
    of the processor-valued dataset, exactly; float batches pass through the input preparation untouched."""
    model_dir = tiny_model_factory(family)
    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(VIDEO_DATA), processor=processor, image_folder=str(REPO / "data_examples"),
                             media=DEMO_MEDIA, max_seq_length=4096)
    common = dict(media=DEMO_MEDIA, video_sources=checked.video_sources)
    floats = SFTDataset(checked.samples, checked.image_paths, processor, **common)
    raw = SFTDataset(checked.samples, checked.image_paths, processor, raw_pixels=True, **common)
    model, _ = load_model(str(model_dir))
    model.train()
    collator = SFTCollator.for_model(processor, model)
    float_batch = collator([floats[i] for i in range(len(floats))])
    raw_batch = collator([raw[i] for i in range(len(raw))])
    assert raw_batch["pixel_values"].dtype == raw_batch["pixel_values_videos"].dtype == torch.uint8
    assert float_batch["pixel_values"].dtype == torch.float32

    float_loss, float_grads = loss_and_grads(model, float_batch)
    norms = dict(image_norm=raw.image_norm, video_norm=raw.video_norm)
    raw_loss, raw_grads = loss_and_grads(model, model_inputs(raw_batch, model, **norms))  # the trainer's input path
    again_loss, _ = loss_and_grads(model, model_inputs(float_batch, model, **norms))
    assert raw_loss == float_loss == again_loss
    assert raw_grads.keys() == float_grads.keys()
    assert all(torch.equal(raw_grads[n], float_grads[n]) for n in float_grads)
    vision = [n for n in float_grads if ".visual." in n]
    assert vision and any(float_grads[n].abs().max() > 0 for n in vision)  # the pixels reached the tower
