"""Encoding each pair's pictures once (train/dpo/trainer.py: encode_vision_once) gives the plain path's loss and
gradients, for every family (the hybrid Qwen3.5 and the MoE ones included), on a batch mixing image, multi-image,
video, history and text-only pairs, with and without the distributed dummy media; and the tower really runs on half
the pictures."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_MEDIA, FAMILIES, REPO

from vlft.data.collator import SFTCollator
from vlft.data.dpo import PreferenceCollator, PreferenceDataset, PreferenceFormat
from vlft.data.prepare import prepare_data
from vlft.train.core.model_inputs import model_inputs
from vlft.train.dpo.loss import preference_loss, sequence_logps
from vlft.train.dpo.trainer import completion_log_probs

DPO_DEMO = REPO / "data_examples" / "dpo_demo.json"


def loss_and_grads(model, batch, vision_once):
    model.zero_grad()
    per_token, mask = completion_log_probs(model, batch, vision_once=vision_once)
    chosen, rejected = sequence_logps(per_token, mask).chunk(2)
    loss = preference_loss(chosen, rejected, chosen.detach() - 0.5, rejected.detach() + 0.25, beta=0.5,
                           loss_type=["sigmoid", "sft"], completion_mask=mask, per_token_logps=per_token,
                           completion_lengths=mask.sum(1)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# every family on the mixed batch (the hybrid Qwen3.5 decoders and the MoE ones too); the dummy media of distributed
# batches on Qwen3-VL (deepstack features too)
@pytest.mark.parametrize("family,distributed",
                         [(f, False) for f in FAMILIES] + [("qwen3_vl", True)])
def test_vision_once_equals_plain_loss_and_gradients(family, distributed, tiny_model_factory, tmp_path):
    from vlft.models.loading import load_model, load_processor

    model_dir = str(tiny_model_factory(family))
    processor = load_processor(model_dir)
    model, fam = load_model(model_dir)
    if fam.moe is not None:  # the grouped-matmul experts take no float64; the eager loop computes the same
        model.set_experts_implementation("eager")
    model.double().train()
    fmt = PreferenceFormat(8192)
    data = prepare_data(str(DPO_DEMO), fmt.record_format(), processor=processor, image_folder=None,
                        media=DEMO_MEDIA, max_seq_length=8192)
    ds = PreferenceDataset(data.samples, data.image_paths, processor, media=DEMO_MEDIA,
                           video_sources=data.video_sources, raw_pixels=True, rejected_media=data.rejected_media)
    collate = PreferenceCollator(SFTCollator.for_model(processor, model, family=fam, distributed=distributed))
    ids = [s.id for s in data.samples]
    batches = [list(range(len(ds))),  # everything: images, multi-image, video, history, text, an image-side pair
               [ids.index("image_side")]]  # nothing to share: the plain path
    assert data.rejected_media[ids.index("image_side")] is not None
    if distributed:  # a text-only batch gets one dummy image and one dummy video, which stay single
        batches.append([ids.index("text_only_2u1_flat")])
        batches.append([ids.index("image"), ids.index("text_only_2u1_flat")])  # images, a dummy video
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        for indices in batches:
            batch = model_inputs(collate([ds[i] for i in indices]), model, image_norm=ds.image_norm,
                                 video_norm=ds.video_norm)
            calls.clear()
            plain_loss, plain = loss_and_grads(model, batch, vision_once=False)
            plain_rows = sum(calls)
            calls.clear()
            once_loss, once = loss_and_grads(model, batch, vision_once=True)
            once_rows = sum(calls)
            assert torch.allclose(once_loss, plain_loss, rtol=0, atol=1e-10), (indices, once_loss, plain_loss)
            assert once.keys() == plain.keys()
            assert any(n.startswith("model.visual") for n in once)  # the tower's gradients are compared too
            for name in plain:
                # float64 model, but the vision rotary embedding runs in float32 (Qwen2.5-VL, Qwen3-VL): summing
                # the two uses' gradients before (once) or after (plain) that part differs at float32 rounding
                scale = plain[name].abs().max().item()
                assert torch.allclose(once[name], plain[name], rtol=0, atol=1e-6 * scale + 1e-12), (indices, name)
            # the tower saw each distinct picture once: the pixel rows of the pictures no other one repeats
            repeated = 0
            for grid_key, copies_key in (("image_grid_thw", "image_copy_of"), ("video_grid_thw", "video_copy_of")):
                if copies_key in batch:
                    copy_of = batch[copies_key].tolist()
                    repeated += sum(int(batch[grid_key][j].prod()) for j, k in enumerate(copy_of) if k != j)
            assert once_rows == plain_rows - repeated
            # what repeats is exactly the rejected rows showing the prompt's pictures: every pair but image_side
            assert (repeated > 0) == any(ids[i] not in ("image_side", "text_only_2u1_flat") for i in indices)
    finally:
        hook.remove()


def test_the_demo_batch_has_pictures_to_share():
    records = json.loads(DPO_DEMO.read_text())
    assert sum(("image" in r) or ("video" in r) for r in records) >= 4
