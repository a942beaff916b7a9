"""The precomputed DPO reference follows the pictures (issue 24, silent fault 2).

The cache key and the resume identity hold the media's contents record by record (train/core/checkpoints.py:
media_digest), so a cache computed on other pictures is never read back: pointing --image_folder at other images
of the same names, or redrawing one in place with its size and modification time unchanged, recomputes the
reference, and the step-1 loss is then its closed form log 2 (sigmoid loss, policy == reference before the first
step) instead of a stale value. A resume on changed pictures is refused, naming them; a resume on the same
pictures at another path is not. --overwrite_output_dir starts without the old run's cache."""
from __future__ import annotations

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlft.data.reasoning import Thinking
from vlft.errors import VlftError
from vlft.train.core.checkpoints import identity_differences, media_digest
from vlft.train.dpo.run import reference_cache_key, run

NAMES = ("pic_0.png", "pic_1.png")
PAIRS = [{"id": f"pair{i}", "image": name,
          "conversations": [{"from": "human", "value": "<image>\nWhat does the picture show?"}],
          "chosen": "Bright noise." if i == 0 else "Dark noise.", "rejected": "A red square."}
         for i, name in enumerate(NAMES)]
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0"]
RUN = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--precompute_ref_log_probs", "true",
       "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", *COMMON]
ONE_STEP = ["--max_steps", "1", "--save_strategy", "no"]


def draw(path, seed: int) -> None:
    """A 56x48 noise picture as an uncompressed PNG: its byte size depends on the dimensions only."""
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, compress_level=0)


def dpo(model_dir, data, folder, out, *flags):
    _, trainer = run(["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(folder),
                      "--output_dir", str(out), *RUN, *flags])
    return trainer


def step1_loss(trainer) -> float:
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] == 1)


def leftovers_of(run_dir, new_dir):
    """A run directory holding only `run_dir`'s cache: what a run killed after the precompute and before its first
    checkpoint leaves, which `--resume_from_checkpoint latest` starts again from step 0."""
    new_dir.mkdir()
    shutil.copytree(run_dir / "ref_log_probs", new_dir / "ref_log_probs")
    return new_dir


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Folders a/ and b/ with pictures of the same names and sizes but other pixels, and the pairs naming them
    by relative path (so --image_folder decides which are read)."""
    root = tmp_path_factory.mktemp("pictures")
    for folder, seeds in (("a", (0, 1)), ("b", (10, 11))):
        (root / folder).mkdir()
        for name, seed in zip(NAMES, seeds):
            draw(root / folder / name, seed)
    data = root / "pairs.json"
    data.write_text(json.dumps(PAIRS))
    return root, data


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, pictures, tmp_path_factory):
    """One step on a/ with the reference precomputed; checkpoint-1 saved."""
    root, data = pictures
    out = tmp_path_factory.mktemp("runs") / "first"
    trainer = dpo(tiny_model_dir, data, root / "a", out, "--max_steps", "1", "--save_strategy", "steps",
                  "--save_steps", "1")
    return out, trainer


def test_first_run_computes_the_reference_and_starts_at_log_2(first_run):
    out, trainer = first_run
    assert trainer.ref_cache.source == "computed"
    assert list((out / "ref_log_probs").iterdir()) == [trainer.ref_cache.path]
    assert abs(step1_loss(trainer) - math.log(2)) < 1e-6


def test_another_image_folder_recomputes_the_reference(tiny_model_dir, pictures, first_run, tmp_path):
    root, data = pictures
    out, first = first_run
    restart = leftovers_of(out, tmp_path / "restart")
    trainer = dpo(tiny_model_dir, data, root / "b", restart, *ONE_STEP, "--resume_from_checkpoint", "latest")
    assert trainer.ref_cache.source == "computed" and trainer.ref_cache.path != first.ref_cache.path
    # the pictures matter to the reference: a stale cache would have given another loss
    assert (trainer.ref_cache.values - first.ref_cache.values).abs().max() > 1e-3
    assert abs(step1_loss(trainer) - math.log(2)) < 1e-6, step1_loss(trainer)


def test_a_picture_redrawn_in_place_recomputes_the_reference(tiny_model_dir, pictures, tmp_path):
    root, data = pictures
    folder = tmp_path / "c"
    shutil.copytree(root / "a", folder)
    before = dpo(tiny_model_dir, data, folder, tmp_path / "before", *ONE_STEP)
    restart = leftovers_of(tmp_path / "before", tmp_path / "restart")
    picture = folder / NAMES[0]
    stat = picture.stat()
    draw(picture, 20)  # in place: same path, same byte size, and the modification time put back
    os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (picture.stat().st_size, picture.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    trainer = dpo(tiny_model_dir, data, folder, restart, *ONE_STEP, "--resume_from_checkpoint", "latest")
    assert trainer.ref_cache.source == "computed" and trainer.ref_cache.path != before.ref_cache.path
    assert (trainer.ref_cache.values[0] - before.ref_cache.values[0]).abs().max() > 1e-3
    assert abs(step1_loss(trainer) - math.log(2)) < 1e-6, step1_loss(trainer)


def test_resume_on_other_pictures_is_refused_naming_them(tiny_model_dir, pictures, first_run):
    root, data = pictures
    out, _ = first_run
    with pytest.raises(VlftError, match=r"(?s)not the run that wrote it.*the media contents differ "
                                        r"\(--image_folder '.*/a' in the checkpoint, '.*/b' now"):
        dpo(tiny_model_dir, data, root / "b", out, "--max_steps", "2", "--save_strategy", "no",
            "--resume_from_checkpoint", str(out / "checkpoint-1"))


def test_resume_on_the_same_pictures_elsewhere_continues_with_the_cache(tiny_model_dir, pictures, first_run,
                                                                        tmp_path):
    """Paths are not part of the identity (as for the data file and the model): a moved folder resumes."""
    root, data = pictures
    out, first = first_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    moved = tmp_path / "moved"
    shutil.copytree(root / "a", moved)
    for picture in moved.iterdir():  # other modification times too: images are compared by their bytes
        os.utime(picture, ns=(0, 0))
    trainer = dpo(tiny_model_dir, data, moved, resumed_dir, "--max_steps", "2", "--save_strategy", "no",
                  "--resume_from_checkpoint", str(resumed_dir / "checkpoint-1"))
    assert trainer.state.global_step == 2
    assert trainer.ref_cache.source == "loaded" and trainer.ref_cache.path.name == first.ref_cache.path.name


def test_overwrite_output_dir_starts_without_the_old_cache(tiny_model_dir, pictures, first_run, tmp_path):
    root, data = pictures
    out, first = first_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    planted = again / "ref_log_probs" / "0123456789abcdef.pt"  # another key's cache: gone too
    shutil.copy(first.ref_cache.path, planted)
    trainer = dpo(tiny_model_dir, data, root / "a", again, *ONE_STEP, "--overwrite_output_dir", "true")
    assert trainer.ref_cache.source == "computed"
    assert sorted((again / "ref_log_probs").iterdir()) == [trainer.ref_cache.path]
    assert abs(step1_loss(trainer) - math.log(2)) < 1e-6


# ------------------------------------------------------------------ the key and the identity, unit by unit
def prepared(folder):
    return SimpleNamespace(image_paths=[[str(folder / n)] for n in NAMES], video_sources=[[], []],
                           rejected_media=[None, None], samples=[SimpleNamespace(index=i) for i in range(2)])


def test_media_digest_follows_contents_and_their_records_not_paths(pictures, tmp_path):
    root, _ = pictures
    moved = tmp_path / "moved"
    shutil.copytree(root / "a", moved)
    digest = media_digest(prepared(root / "a"))
    assert media_digest(prepared(moved)) == digest
    assert media_digest(prepared(root / "b")) != digest
    swapped = prepared(root / "a")
    swapped.image_paths.reverse()  # the same files, each shown with the other record's text
    assert media_digest(swapped) != digest
    rejected = prepared(root / "a")
    rejected.rejected_media = [([str(root / "b" / NAMES[0])], []), None]  # an image-side pair's other picture
    assert media_digest(rejected) != digest


def test_the_key_covers_the_tokenisation(tiny_model_dir, pictures):
    root, data = pictures

    def key(**change):
        given = dict(data_path=str(data), data=prepared(root / "a"), media_sha256="m", model_id=str(tiny_model_dir),
                     media="settings", thinking=Thinking(), chat_template="{{ messages }}",
                     model_args=SimpleNamespace(attn_implementation="sdpa"),
                     tune_args=SimpleNamespace(bits=16, quant_type="nf4", double_quant=True),
                     train_args=SimpleNamespace(bf16=False, fp16=False, truncation_mode="keep_end", ld_alpha=None),
                     max_length=512)
        return reference_cache_key(**{**given, **change})

    base = key()
    assert key() == base
    assert key(media_sha256="n") != base
    assert key(thinking=Thinking(enable_thinking=False)) != base
    assert key(thinking=Thinking(preserve_thinking=True)) != base
    assert key(chat_template="{{ messages }} ") != base
    assert key(tune_args=SimpleNamespace(bits=4, quant_type="nf4", double_quant=True)) != base


def test_a_resume_names_pictures_redrawn_in_the_same_folder():
    saved = {"media_sha256": "1" * 64, "image_folder": "/data/img"}
    assert identity_differences(saved, dict(saved)) == []
    diffs = identity_differences(saved, {**saved, "media_sha256": "2" * 64})
    assert len(diffs) == 1 and "the same --image_folder '/data/img': images or videos were replaced or redrawn" in diffs[0]
    # a checkpoint of an older vlft (no media identity) still resumes
    assert identity_differences({"image_folder": "/data/img"}, {**saved, "media_sha256": "2" * 64}) == []
