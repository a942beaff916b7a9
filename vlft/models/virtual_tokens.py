"""Virtual-token methods (P-Tuning, arXiv 2103.10385; prompt tuning, arXiv 2104.08691) on Qwen-VL, with PEFT's
configs, prompt encoders and saved format.

Why PEFT's own forward is not enough here: `PeftModelForCausalLM.forward` prepends the V virtual embeddings through
`inputs_embeds` and calls the model without `input_ids` (and drops `position_ids`). Qwen-VL computes its mRoPE
positions (`get_rope_index`: text tokens advance by one, an image or video block takes (t, h, w) positions from its
grid) from `input_ids` and `mm_token_type_ids`; without them it falls back to 1-D positions 0..L+V-1 for every
token, so every image and video token gets a wrong position, and `mm_token_type_ids` (length L) no longer lines up
with the L+V embeddings.

What `VirtualTokenModel` does instead (its `forward` and `generate`, for virtual-token configs only): the sequence is
extended by V slots in front: `input_ids` with a plain text id there (`VIRTUAL_SLOT_ID`, whose embedding is never
used), `mm_token_type_ids` with V text (0) entries, `attention_mask` with V ones, `labels` with V -100s, and
`inputs_embeds` = [the prompt encoder's V embeddings; embed(input_ids)]. forward computes the (t, h, w) positions
[3, B, V+L] of the extended ids with the model's own `get_rope_index` (text-only batches: 0, 1, ... over the attended
tokens) and calls the model with inputs_embeds and those positions (Qwen3-VL takes no input_ids next to
inputs_embeds); the model finds the image / video placeholders by their embedding and scatters the vision features
(and Qwen3-VL's deepstack features) there. So the virtual tokens are text at positions 0..V-1, and every real
token's positions are those of the sequence alone shifted by V: tests/train/test_virtual_tokens.py checks the real
tokens' logits against a base model fed those embeddings and positions built independently, for each family and for
image, video and text records. generate hands the extended input_ids and inputs_embeds to the model's generate, which
computes the same positions from the ids (and the rope deltas the cached decoding steps use).

The saved run is PEFT's (adapter_config.json with peft_type P_TUNING / PROMPT_TUNING, adapter_model.safetensors with
the prompt embeddings / encoder): `PeftModel.from_pretrained` loads it. Loaded that way, PEFT's forward is used,
with the position problem above for image and video inputs; `load_virtual_tokens` loads it into this class.
Packed rows are refused (config.py): the virtual tokens would precede the row, not each record.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from peft import PeftModelForCausalLM

from vlft.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

VIRTUAL_SLOT_ID = 0  # a text token id ("!" in Qwen's vocabulary); only its position and type (text) are used


def virtual_token_config(peft_type: str, num_virtual_tokens: int, *, encoder_hidden_size: int | None = None,
                         encoder_reparameterization_type: str | None = None):
    """PEFT's config: PromptEncoderConfig (p_tuning) or PromptTuningConfig (prompt_tuning, random init)."""
    from peft import PromptEncoderConfig, PromptTuningConfig

    if peft_type == "p_tuning":
        extra = {k: v for k, v in (("encoder_hidden_size", encoder_hidden_size),
                                   ("encoder_reparameterization_type", encoder_reparameterization_type)) if v is not None}
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **extra)
    if peft_type == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    raise ValueError(f"not a virtual-token method: {peft_type}")


class VirtualTokenModel(PeftModelForCausalLM):
    """PEFT's causal-LM wrapper whose virtual-token forward and generate keep Qwen-VL's inputs aligned (module
    docstring). Non-virtual-token configs behave exactly as PEFT's."""

    def _extend(self, input_ids, attention_mask=None, labels=None, mm_token_type_ids=None):
        """The V-longer ids, mask, labels and token types, and inputs_embeds = [virtual; embed(input_ids)]."""
        v = self.active_peft_config.num_virtual_tokens
        batch = input_ids.shape[0]
        device = input_ids.device
        ids = torch.cat([torch.full((batch, v), VIRTUAL_SLOT_ID, dtype=input_ids.dtype, device=device), input_ids], 1)
        embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch_size=batch).to(embeds.dtype)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = {"input_ids": ids, "inputs_embeds": torch.cat([prompts, embeds], 1),
               "attention_mask": torch.cat([attention_mask.new_ones((batch, v)), attention_mask], 1)}
        if labels is not None:
            out["labels"] = torch.cat([labels.new_full((batch, v), -100), labels], 1)
        if mm_token_type_ids is not None:
            out["mm_token_type_ids"] = torch.cat([mm_token_type_ids.new_zeros((batch, v)), mm_token_type_ids], 1)
        return out

    def _positions(self, extended: dict, kwargs: dict) -> torch.Tensor:
        """[3, B, V+L] (t, h, w) positions of the extended sequence, from the model's own `get_rope_index` when the
        batch has images or videos, else 0, 1, ... over the attended tokens (what the model does for text)."""
        mask = extended["attention_mask"]
        if kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            return text.unsqueeze(0).expand(3, -1, -1)
        if extended.get("mm_token_type_ids") is None:
            raise ValueError("virtual tokens with images or videos need mm_token_type_ids (vlft's collator sends them)")
        inner = self.get_base_model().model
        accepted = inspect.signature(inner.get_rope_index).parameters
        given = {"mm_token_type_ids": extended["mm_token_type_ids"], "attention_mask": mask, **kwargs}
        rope, _ = inner.get_rope_index(extended["input_ids"],
                                       **{k: v for k, v in given.items() if k in accepted and v is not None})
        return rope

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        """Logits [B, V+L, vocab] (the first V rows are the virtual tokens'); the loss over the real tokens.

        The model gets inputs_embeds and the positions computed here (Qwen3-VL takes no input_ids next to
        inputs_embeds); it finds the image / video placeholders by their embedding, as it does for any
        inputs_embeds, and a position_ids of its own leaves no stale `rope_deltas` in play."""
        if not self.active_peft_config.is_prompt_learning:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, **kwargs)
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("virtual tokens need input_ids (the positions are computed from them), not inputs_embeds")
        if kwargs.get("position_ids") is not None:
            raise ValueError("virtual tokens with given position_ids (packed rows) are not supported")
        kwargs.pop("position_ids", None)
        extended = self._extend(input_ids, attention_mask, labels, kwargs.pop("mm_token_type_ids", None))
        positions = self._positions(extended, {k: kwargs.get(k) for k in _ROPE_INPUTS})
        extended.pop("mm_token_type_ids", None)
        extended.pop("input_ids")
        return self.base_model(**extended, position_ids=positions, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """The base model's generate on the extended inputs (input_ids for its own position computation,
        inputs_embeds for the prefill); returns [B, L + new tokens] like a model without virtual tokens."""
        if not self.active_peft_config.is_prompt_learning:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        v = self.active_peft_config.num_virtual_tokens
        extended = self._extend(input_ids, attention_mask, None, kwargs.pop("mm_token_type_ids", None))
        out = self.base_model.generate(**extended, **kwargs)
        return out[:, v:]


_ROPE_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def apply_virtual_tokens(model, config) -> VirtualTokenModel:
    """Wrap a bare Qwen-VL model with a fresh virtual-token adapter; PEFT freezes every base weight."""
    with warnings.catch_warnings():  # the same PEFT/transformers deprecation warning as models/lora.py: wrap_peft
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return VirtualTokenModel(model, config)


def load_virtual_tokens(model, run_dir) -> VirtualTokenModel:
    """A saved virtual-token run on its base model, for inference (PEFT's loading, into VirtualTokenModel); the
    opener of models/loading.py `open_trained` for this kind. VlftError when the adapter file holds other tensors."""
    from pathlib import Path

    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(run_dir))
    config.inference_mode = True
    peft_model = apply_virtual_tokens(model, config)
    # PEFT saves the V virtual embeddings themselves ('prompt_embeddings': for P-Tuning the encoder's output, not
    # the encoder) and, in inference mode, uses them as they are; loading is a strict load_state_dict
    state = load_file(str(Path(run_dir) / ADAPTER_WEIGHTS))
    if set(state) != {"prompt_embeddings"}:
        from vlft.errors import VlftError

        raise VlftError(f"{Path(run_dir) / ADAPTER_WEIGHTS} holds {sorted(state)[:4]}, not the prompt_embeddings PEFT "
                        "saves for virtual tokens: the run's adapter files do not belong together; give another "
                        "checkpoint of the run")
    set_peft_model_state_dict(peft_model, state)
    return peft_model.eval()


def is_virtual_token_run(run_dir) -> bool:
    """True when a run directory's adapter is a virtual-token method (PEFT's adapter_config.json says so)."""
    import json
    from pathlib import Path

    path = Path(run_dir) / ADAPTER_CONFIG
    return path.is_file() and json.loads(path.read_text()).get("peft_type") in ("P_TUNING", "PROMPT_TUNING")
