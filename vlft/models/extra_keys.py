"""Carry the checkpoint tensors transformers drops on load, and servers still read, from the base model's files into
a model saved by vlft (a merge, a full fine-tuning run's final model).

Why: Qwen3.5 and Qwen3.5-MoE checkpoints hold a multi-token-prediction head, `mtp.*`, that transformers 5.24 never
builds (`_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]` on Qwen3_5PreTrainedModel and
Qwen3_5MoePreTrainedModel), so `from_pretrained` + `save_pretrained` loses it silently and vLLM's MTP speculative
decoding has nothing to load. The family descriptor names these prefixes (`Family.extra_checkpoint_prefixes`). The
config fields that describe the head (`text_config.mtp_num_hidden_layers`, `mtp_use_dedicated_embeddings`) need no
help: transformers keeps a config's unknown fields through save_pretrained (probed on 5.24).

The head never trains (the model has no such module), so its tensors are copied byte for byte, in the dtype the base
files hold, also when the merged weights were cast to another one (`vlft merge --dtype`): a cast would change the
head's values (down) or double its size for nothing (up), and servers cast each weight to their own dtype on load
anyway (vLLM's weight loaders copy into the parameter's dtype).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlft.errors import VlftError
from vlft.run_dir import EXTRA_SHARD
from vlft.run_dir import MODEL_INDEX as INDEX
from vlft.run_dir import MODEL_WEIGHTS as WEIGHTS
from vlft.utils import log


def local_model_dir(base: str | os.PathLike) -> Path:
    """The directory holding `base`'s files: `base` itself when it is a directory, else the snapshot of the hub id
    `base` in the local Hugging Face cache (never downloaded: the training or merge that calls this loaded the model
    from there already). Raises VlftError when it is neither."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(base), local_files_only=True))
    except (OSError, HFValidationError) as err:
        raise VlftError(f"cannot read the base model {str(base)!r} (--base_model / --model_id): it is no local "
                        f"directory and not in the Hugging Face cache ({type(err).__name__}). Pass the local directory "
                        "of the model this run trained from") from None


def _header(path: Path) -> dict:
    """A safetensors file's header: tensor name -> {dtype, shape, data_offsets (bytes)}, without `__metadata__`.
    The format (safetensors' README): an 8-byte little-endian header length, then that many bytes of JSON."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _weight_map(folder: Path, what: str) -> dict[str, str]:
    """tensor name -> file name of the safetensors weights in `folder`: from its index when it has one, else from
    the header of its single model.safetensors. Raises VlftError when there is neither or it cannot be read."""
    try:
        if (folder / INDEX).is_file():
            return dict(json.loads((folder / INDEX).read_text())["weight_map"])
        if (folder / WEIGHTS).is_file():
            return dict.fromkeys(_header(folder / WEIGHTS), WEIGHTS)
    except (OSError, ValueError, KeyError) as err:
        raise VlftError(f"cannot read the weights of {what} {folder}: {err}") from None
    raise VlftError(f"{what} {folder} has no safetensors weights ({WEIGHTS} or {INDEX})")


def carry_extra_tensors(base: str | os.PathLike, output_dir: str | os.PathLike, prefixes: tuple[str, ...]) -> int:
    """Copy every tensor of the base model whose name starts with one of `prefixes` into `output_dir`, a model just
    written by save_pretrained (safetensors, sharded or not). Returns how many tensors were carried and logs it.

    The carried tensors go to extra shards `model-extra-0000i-of-0000k.safetensors`, one per base file that holds
    any, byte for byte and in the base's dtype (see the module docstring), and model.safetensors.index.json (created
    or updated) lists every tensor once. The files save_pretrained wrote keep their names, so transformers loads the
    model as before (it prefers a model.safetensors to the index, and would skip the extras anyway); vLLM reads every
    file the index names. A tensor the output already has is left as it is. Nothing changes when `prefixes` is empty
    or the base has no such tensor. Run it on a directory not yet in place (merge's temporary directory, a staged
    final save): a failure leaves the output half-written.

    Raises VlftError when the base's files cannot be found or read (a hub id is looked up in the local cache only)."""
    if not prefixes:
        return 0
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    out = Path(output_dir)
    source = local_model_dir(base)
    wanted = {k: f for k, f in _weight_map(source, "the base model").items() if k.startswith(prefixes)}
    names = "/".join(f"{p}*" for p in prefixes)
    if not wanted:
        log(f"the base model {base} holds no {names} tensors: none carried")
        return 0
    current = _weight_map(out, "the saved model")
    wanted = {k: f for k, f in wanted.items() if k not in current}
    if not wanted:
        log(f"the saved model already holds the base model's {names} tensors: none carried")
        return 0

    groups: dict[str, list[str]] = {}
    for key, file in sorted(wanted.items()):
        groups.setdefault(file, []).append(key)
    try:
        index = json.loads((out / INDEX).read_text()) if (out / INDEX).is_file() else {"metadata": {}}
        metadata = dict(index.get("metadata") or {})
        if "total_size" not in metadata:
            metadata["total_size"] = sum(end - begin for f in set(current.values())
                                         for begin, end in (v["data_offsets"] for v in _header(out / f).values()))
    except (OSError, ValueError, KeyError) as err:
        raise VlftError(f"cannot read the weights just saved in {out}: {err}") from None
    weight_map = dict(current)
    for i, file in enumerate(groups, 1):
        path, name = source / file, EXTRA_SHARD.format(index=i, count=len(groups))
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in groups[file]}
        except (OSError, SafetensorError) as err:
            raise VlftError(f"cannot read the base model's {names} tensors from {path}: {err}. Is the base model "
                            f"{base} complete?") from None
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        metadata["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
        if "total_parameters" in metadata:
            metadata["total_parameters"] += sum(t.numel() for t in tensors.values())
    index.update(metadata=metadata, weight_map=dict(sorted(weight_map.items())))
    (out / (INDEX + ".tmp")).write_text(json.dumps(index, indent=2) + "\n")
    os.replace(out / (INDEX + ".tmp"), out / INDEX)
    log(f"carried {len(wanted)} {names} tensors from the base model {base} (transformers does not load them; servers "
        "do, e.g. vLLM's multi-token prediction)")
    return len(wanted)


def carry_into_final_save(base: str | None, staged: str | os.PathLike, family) -> None:
    """The final save of a training run: carry `family.extra_checkpoint_prefixes` from `base` (the run's --model_id)
    into the staged save when it is a full model (a LoRA run's save holds its adapter only, and merge carries them).

    Unlike merge, which stops (and can simply be run again), a failure here is a warning: the trained model is
    published without the extra tensors rather than lost, and the other processes waiting at the save's barrier are
    not left hanging."""
    from vlft.run_dir import is_adapter_run

    if not base or family is None or not family.extra_checkpoint_prefixes or is_adapter_run(staged):
        return
    try:
        carry_extra_tensors(base, staged, family.extra_checkpoint_prefixes)
    except VlftError as err:
        log(f"warning: the final model is saved without the base model's {'/'.join(family.extra_checkpoint_prefixes)} "
            f"tensors (a server's multi-token prediction needs them; copy them from the base by hand): {err}")
