"""Checkpoint tensors transformers drops on load (Qwen3.5's multi-token-prediction head `mtp.*`) reach a merged model
and a full fine-tuning run's final model from the base files, bit for bit, with an index that lists every tensor
once; the config field that describes the head survives too."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlft.errors import VlftError
from vlft.merge import merge
from vlft.models.extra_keys import INDEX, WEIGHTS, carry_extra_tensors, carry_into_final_save
from vlft.train.sft.run import run

MTP = ("mtp.",)


def mtp_head(hidden: int) -> dict:
    """Tensors named and shaped as a released Qwen3.5 checkpoint's one-layer MTP head (a subset), in bf16 as released
    (the tiny base itself is fp32, so a carried tensor that took the model's dtype would show)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"mtp.fc.weight": (hidden, 2 * hidden), "mtp.norm.weight": (hidden,),
              "mtp.pre_fc_norm_embedding.weight": (hidden,), "mtp.pre_fc_norm_hidden.weight": (hidden,),
              "mtp.layers.0.input_layernorm.weight": (hidden,),
              "mtp.layers.0.self_attn.o_proj.weight": (hidden, hidden),
              "mtp.layers.0.mlp.down_proj.weight": (hidden, 2 * hidden)}
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}


def with_mtp(tiny, dst, *, shards: int) -> dict:
    """A copy of the tiny qwen3_5 model at `dst` whose files hold an MTP head as a real checkpoint does, in one file
    or in two shards with an index (the head split across both); its config gets the released config's field.
    Returns the head's tensors (the oracle)."""
    shutil.copytree(tiny, dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"].update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)
    (dst / "config.json").write_text(json.dumps(config))
    head = mtp_head(config["text_config"]["hidden_size"])
    tensors = {**load_file(str(dst / WEIGHTS)), **head}
    if shards == 1:
        save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
        return head
    (dst / WEIGHTS).unlink()
    weight_map = {}
    for i, keys in enumerate((sorted(tensors)[0::2], sorted(tensors)[1::2]), 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in keys}, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    assert len(set(weight_map.values()) & {weight_map[k] for k in head}) == 2  # the head spans both shards
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    return head


def files_of(folder) -> dict[str, list[str]]:
    """safetensors file name -> the tensor names its header holds (read from the files, not from any index)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = list(f.keys())
    return out


def assert_carried(out, head: dict, *, keys_before: set[str]) -> None:
    """`out` holds every head tensor bit for bit in bf16; its index names each tensor of its files exactly once (the
    model's own keys and the head), and its total_size is the bytes of all of them."""
    index = json.loads((out / INDEX).read_text())
    files = files_of(out)
    listed = [k for keys in files.values() for k in keys]
    assert len(listed) == len(set(listed)), "a tensor is stored twice"
    assert set(index["weight_map"]) == set(listed) == keys_before | set(head)
    for key, name in index["weight_map"].items():
        assert key in files[name]
    total = 0
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
                if key in head:
                    assert tensor.dtype == torch.bfloat16
                    assert torch.equal(tensor.view(torch.int16), head[key].view(torch.int16)), key
    assert index["metadata"]["total_size"] == total


@pytest.fixture(scope="module")
def bases(tiny_model_factory, tmp_path_factory):
    """The tiny qwen3_5 model with an MTP head, in one file and in two shards: (path, head) by shard count."""
    tiny, root = tiny_model_factory("qwen3_5"), tmp_path_factory.mktemp("mtp-bases")
    return {n: (root / f"base{n}", with_mtp(tiny, root / f"base{n}", shards=n)) for n in (1, 2)}


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp-lora") / "run"
    run(["--model_id", str(bases[1][0]), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
         "--output_dir", str(out), "--lora_enable", "true", "--lora_rank", "4", "--per_device_train_batch_size", "2",
         "--learning_rate", "5e-3", "--max_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true"])
    return out


@pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed")  # --base_model: base2
@pytest.mark.parametrize(("shards", "dtype"), [(1, "auto"), (2, "fp16")])
def test_merge_carries_the_mtp_head(bases, lora_run, tmp_path, shards, dtype):
    from transformers import AutoModelForImageTextToText

    base, head = bases[shards]
    out = merge(str(lora_run), str(tmp_path / "merged"), base_model=str(base), dtype=dtype)
    own = files_of(out)[WEIGHTS]  # what save_pretrained wrote, untouched: transformers reads this file
    assert not any(k.startswith(MTP) for k in own)
    assert_carried(out, head, keys_before=set(own))
    with safe_open(str(out / WEIGHTS), framework="pt") as f:  # --dtype casts the merged weights, not the frozen head
        assert f.get_tensor("lm_head.weight").dtype == (torch.float16 if dtype == "fp16" else torch.float32)
    assert json.loads((out / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1

    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    merged = load_file(str(out / WEIGHTS))
    for name, tensor in model.state_dict().items():
        if name in merged:
            assert torch.equal(tensor, merged[name].to(tensor.dtype)), name


def test_full_fine_tuning_keeps_the_mtp_head(bases, tmp_path):
    base, head = bases[2]
    out = tmp_path / "full"
    run(["--model_id", str(base), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
         "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no",
         "--disable_tqdm", "true"])
    assert_carried(out, head, keys_before=set(files_of(out)[WEIGHTS]))
    assert not (out / ".vlft-staging").exists()


def test_sharded_output_index_is_extended_and_a_second_call_adds_nothing(bases, tmp_path):
    from transformers import AutoModelForImageTextToText

    base, head = bases[2]
    out = tmp_path / "saved"
    AutoModelForImageTextToText.from_pretrained(base).save_pretrained(out, max_shard_size="300KB")
    before = json.loads((out / INDEX).read_text())
    assert len(set(before["weight_map"].values())) > 1 and "total_parameters" in before["metadata"]
    shard_bytes = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}

    assert carry_extra_tensors(str(base), out, MTP) == len(head)
    assert_carried(out, head, keys_before=set(before["weight_map"]))
    after = json.loads((out / INDEX).read_text())
    assert after["metadata"]["total_parameters"] == (before["metadata"]["total_parameters"]
                                                     + sum(t.numel() for t in head.values()))
    assert {p: (out / p).read_bytes() for p in shard_bytes} == shard_bytes  # transformers' shards as they were

    assert carry_extra_tensors(str(base), out, MTP) == 0
    assert json.loads((out / INDEX).read_text()) == after


def test_nothing_changes_without_a_head_or_without_prefixes(tiny_model_factory, bases, tmp_path):
    out = tmp_path / "saved"
    shutil.copytree(tiny_model_factory("qwen3_5"), out)
    assert carry_extra_tensors(str(bases[1][0]), out, ()) == 0
    assert carry_extra_tensors(str(tiny_model_factory("qwen3_5")), out, MTP) == 0  # a base without mtp.*
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_model_factory("qwen3_5").iterdir())


def test_a_hub_id_is_read_from_the_local_cache(bases, tiny_model_factory, tmp_path, monkeypatch):
    import huggingface_hub.constants

    base, head = bases[2]
    cache = tmp_path / "hub"
    snapshot = cache / "models--Qwen--Tiny-MTP" / "snapshots" / ("0" * 40)
    shutil.copytree(base, snapshot)
    (cache / "models--Qwen--Tiny-MTP" / "refs").mkdir()
    (cache / "models--Qwen--Tiny-MTP" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "saved"
    shutil.copytree(tiny_model_factory("qwen3_5"), out)
    assert carry_extra_tensors("Qwen/Tiny-MTP", out, MTP) == len(head)
    assert_carried(out, head, keys_before=set(files_of(out)[WEIGHTS]))
    with pytest.raises(VlftError, match="not in the Hugging Face cache"):
        carry_extra_tensors("Qwen/Not-Cached", out, MTP)


def test_unreadable_base_files_are_a_clear_error(bases, tiny_model_factory, tmp_path):
    out = tmp_path / "saved"
    shutil.copytree(tiny_model_factory("qwen3_5"), out)
    broken = tmp_path / "broken"
    shutil.copytree(bases[2][0], broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(VlftError, match="model-00002-of-00002.safetensors"):
        carry_extra_tensors(str(broken), out, MTP)
    (broken / INDEX).unlink()
    with pytest.raises(VlftError, match="has no safetensors weights"):
        carry_extra_tensors(str(broken), out, MTP)


def test_a_final_save_warns_instead_of_failing_and_leaves_adapters_alone(bases, tiny_model_factory, tmp_path, capsys):
    from vlft.models.registry import get_family

    family = get_family("qwen3_5")
    out = tmp_path / "staged"
    shutil.copytree(tiny_model_factory("qwen3_5"), out)
    names = sorted(p.name for p in out.iterdir())
    carry_into_final_save(str(tmp_path / "gone"), out, family)  # the base vanished during training
    assert "warning: the final model is saved without the base model's mtp." in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == names
    (out / "adapter_config.json").write_text("{}")  # a LoRA run's save: its adapter only
    carry_into_final_save(str(bases[1][0]), out, family)
    assert not (out / INDEX).exists()
