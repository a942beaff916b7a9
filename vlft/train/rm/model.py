"""The reward model: a Qwen-VL (any family vlft supports) with a scalar head on the final hidden state of each
sequence's last non-pad token, as transformers' `GenericForSequenceClassification` and TRL's reward models
(`AutoModelForSequenceClassification`, num_labels=1) have it: `score = Linear(hidden, 1, bias=False)`, applied to
the language model's output after its last norm, read at the last position whose attention mask is 1.

The head is a submodule of the bare model, `score` (transformers' name), so that it trains with the rest through the
Trainer, DDP and DeepSpeed (ZeRO-3 partitions it like any parameter added after loading). It reaches the output
through the model's library forward: for the length of one call (`head_in_place_of_lm_head`) a pre-hook on the LM
head keeps the hidden states the head would read and gives it none (no vocabulary-wide logits are built), and a hook
after it returns `score(hidden)` as the logits. The positions are chosen with the forward's own `logits_to_keep`, so
the logits are [N, K, 1] at the K distinct last positions, and the reward of row n is logits[n, column of its last
position, 0]. Nothing else of the forward changes (media, mRoPE, LoRA, Liger, checkpointing).

Saved: the language model's files exactly as an SFT run writes them (full weights, or adapter + the weights trained
next to it), so that vlft's shared loader opens them, plus the head in its own files (run_dir.py
REWARD_HEAD_WEIGHTS, REWARD_HEAD_CONFIG: the weight and the rule that reads it). While a save or a resume load runs,
the head is taken out of the model (`head_detached`) and written or read on its own. `load_reward_model` opens a
run (full or LoRA, or a checkpoint-N) and puts the head back.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from vlft.errors import VlftError
from vlft.run_dir import REWARD_HEAD_CONFIG, REWARD_HEAD_WEIGHTS
from vlft.train.preference.logprobs import NON_MODEL_KEYS, encode_vision_once

HEAD_NAME = "score"  # the head's attribute on the bare model (transformers' *ForSequenceClassification name)
POOLING = "last_non_pad_token"  # the position of each row's last attention-mask 1 (right padding)
HEAD_FORMAT = 1  # version of the head files' layout
NOT_MODEL_INPUTS = (*NON_MODEL_KEYS, "margin")  # batch keys of the reward stage that are no model arguments


def hidden_size(model) -> int:
    """The language model's hidden width (from the config: under ZeRO-3 the weights are empty shards)."""
    config = model.config
    return int(getattr(config, "text_config", config).hidden_size)


def attach_reward_head(owner, *, seed: int = 0, weight: torch.Tensor | None = None) -> torch.nn.Linear:
    """Give the bare model `owner` its head `score`: Linear(hidden, 1, bias=False) in float32, on the LM head's
    device, trainable. New heads are drawn from N(0, initializer_range) with `seed` (transformers'
    `_init_weights` for a *ForSequenceClassification head; the same on every process); `weight` [1, hidden] loads a
    trained one instead. ValueError when `weight` has another shape."""
    size = hidden_size(owner)
    head = torch.nn.Linear(size, 1, bias=False, dtype=torch.float32)
    with torch.no_grad():
        if weight is None:
            text = getattr(owner.config, "text_config", owner.config)
            std = float(getattr(text, "initializer_range", 0.02))
            head.weight.copy_(torch.randn((1, size), generator=torch.Generator().manual_seed(seed)) * std)
        else:
            if tuple(weight.shape) != (1, size):
                raise ValueError(f"a reward head of shape {tuple(weight.shape)} does not fit hidden size {size}")
            head.weight.copy_(weight)
    head.to(owner.get_output_embeddings().weight.device)
    head.weight.requires_grad_(True)
    owner.add_module(HEAD_NAME, head)
    return head


def reward_head(owner) -> torch.nn.Linear:
    head = getattr(owner, HEAD_NAME, None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(owner).__name__} has no reward head ({HEAD_NAME}); attach_reward_head first")
    return head


def freeze_unused_lm_head(owner) -> bool:
    """The LM head's own weight (when not tied to the token embeddings) takes no part in a reward: freeze it, so that
    no optimizer state is kept for it and DDP finds no trainable weight without a gradient. Returns whether it was
    trainable."""
    lm_head, embeddings = owner.get_output_embeddings(), owner.get_input_embeddings()
    if lm_head.weight is embeddings.weight or not lm_head.weight.requires_grad:
        return False
    for param in lm_head.parameters():
        param.requires_grad_(False)
    return True


@contextlib.contextmanager
def head_detached(owner):
    """The head out of `owner`'s module tree for the duration (yields it): its parameters are then in no saved file
    of the model, no resume check and no `vlft_trained.json` (the shared loaders open the model as an SFT run's).
    Nested (a save computes the resume identity inside the save): the inner one changes nothing and yields None."""
    if HEAD_NAME not in owner._modules:
        yield None
        return
    head = owner._modules.pop(HEAD_NAME)
    try:
        yield head
    finally:
        owner._modules[HEAD_NAME] = head


@contextlib.contextmanager
def head_in_place_of_lm_head(owner):
    """For the duration, `owner`'s LM head returns `score(hidden)` [..., 1] for the hidden states it is given,
    instead of vocabulary logits (which are not computed: the LM head gets an empty slice). The head is called as a
    module inside the forward, so its output is part of what the forward returns (DDP, ZeRO-3 hooks)."""
    lm_head, head = owner.get_output_embeddings(), reward_head(owner)
    kept: list[torch.Tensor] = []

    def before(module, args):
        kept.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    def after(module, args, output):
        hidden = kept.pop()
        return head(hidden.to(head.weight.dtype))

    handles = [lm_head.register_forward_pre_hook(before), lm_head.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] index of each row's last position whose mask is 1 (transformers' GenericForSequenceClassification reads
    the last non-pad token; vlft's batches are right-padded, and a distributed batch's dummy media tokens are
    masked)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


def reward_forward(model, owner, inputs: dict, *, vision_once: bool = False) -> torch.Tensor:
    """[N] float32 rewards of a batch's rows from one forward of `model` (the trained model: PeftModel, DDP or
    DeepSpeed engine around `owner`, the bare model holding the head; or `owner` itself).

    inputs: vlft's batch (input_ids, attention_mask [N, L] right-padded, media, `mm_token_type_ids`...); keys that
    are no model arguments (labels, pair_index, margin, ...) are left out. vision_once: encode each distinct picture
    once (train/preference/logprobs.py `encode_vision_once`, from the preference collator's `image_copy_of`)."""
    last = last_positions(inputs["attention_mask"])
    kept, column = torch.unique(last, sorted=True, return_inverse=True)
    if vision_once:
        inputs = encode_vision_once(model, inputs)
    kwargs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
    with head_in_place_of_lm_head(owner):
        logits = model(**kwargs, use_cache=False, logits_to_keep=kept).logits  # [N, K, 1]
    return logits[torch.arange(logits.shape[0], device=logits.device), column, 0].float()


# --- the head's files ----------------------------------------------------------------------------------------------


def head_weight(head: torch.nn.Linear) -> torch.Tensor:
    """The head's weight [1, hidden] on the CPU in float32; under ZeRO-3 gathered from its shards (every process must
    call this: the gather is a collective)."""
    weight = head.weight
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().float().cpu().clone()
    return weight.detach().float().cpu().clone()


def write_reward_head(weight: torch.Tensor, directory, *, base_model: str | None = None) -> None:
    """REWARD_HEAD_WEIGHTS ({"weight": [1, hidden] float32}) and REWARD_HEAD_CONFIG (what the head reads) into
    `directory`."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.float().contiguous()}, str(out / REWARD_HEAD_WEIGHTS), metadata={"format": "pt"})
    record = {
        "format": HEAD_FORMAT, "num_labels": 1, "hidden_size": int(weight.shape[1]), "bias": False,
        "module": HEAD_NAME, "pooling": POOLING,
        "input": "the language model's last hidden state (after its final norm, what the LM head reads) at each "
                 "sequence's last non-pad token: the last position whose attention_mask is 1",
        "sequence": "the model's chat template: the prompt (with its images and videos) and the answer, as vlft rm "
                    "encodes a pair's chosen sequence (vlft.data.rm.CompletionRows)",
        "reward": "score(hidden) = hidden . weight, a float; higher is better",
        "base_model": base_model,
    }
    (out / REWARD_HEAD_CONFIG).write_text(json.dumps(record, indent=1) + "\n")


def read_reward_head(directory) -> torch.Tensor:
    """The head weight [1, hidden] saved in `directory`. VlftError naming the folder when it holds none, or a head
    of a layout this vlft does not read."""
    from safetensors.torch import load_file

    folder = Path(directory)
    weights, record = folder / REWARD_HEAD_WEIGHTS, folder / REWARD_HEAD_CONFIG
    if not weights.is_file():
        raise VlftError(f"{folder} holds no reward head ({REWARD_HEAD_WEIGHTS}): give the --output_dir of a vlft rm "
                        "run or a checkpoint-N inside it")
    if record.is_file():
        config = json.loads(record.read_text())
        if config.get("format") != HEAD_FORMAT or config.get("pooling") != POOLING:
            raise VlftError(f"{record}: a reward head of format {config.get('format')} with pooling "
                            f"{config.get('pooling')!r}; this vlft reads format {HEAD_FORMAT}, {POOLING!r}")
    tensors = load_file(str(weights))
    if set(tensors) != {"weight"} or tensors["weight"].ndim != 2 or tensors["weight"].shape[0] != 1:
        raise VlftError(f"{weights} holds {sorted(tensors)} (shapes {[tuple(t.shape) for t in tensors.values()]}), not "
                        "one weight [1, hidden]; the file was changed after training")
    return tensors["weight"]


@contextlib.contextmanager
def loading_whole():
    """While a ZeRO-3 config is registered with transformers (a ZeRO-3 training run: TrainingArguments register it),
    `from_pretrained` builds models partitioned for DeepSpeed's engine (zero.Init). A reward model used beside the
    policy is a plain module on one device, never wrapped by DeepSpeed: unregister the config for the duration of its
    load, and register it again after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


# --- a trained reward model, for scoring ---------------------------------------------------------------------------


class RewardModel(torch.nn.Module):
    """A reward model opened for scoring (`load_reward_model`): `model`, the bare Qwen-VL with its head (eval mode, no
    gradients), and what encodes inputs as its training did: `processor` (with training's pixel budgets), `media`
    (data.prepare.MediaSettings), `thinking` (the reasoning flags). A plain module: under DeepSpeed it is never
    wrapped, and scoring runs no collective."""

    def __init__(self, model, *, family, processor, media, thinking, path: str):
        super().__init__()
        from vlft.data.collator import SFTCollator
        from vlft.data.rm import CompletionRows

        self.model = model
        self.family = family
        self.processor = processor
        self.media = media
        self.thinking = thinking
        self.path = path
        self.rows = CompletionRows(processor, media=media, thinking=thinking)
        self.collator = SFTCollator.for_model(processor, model)

    @property
    def device(self) -> torch.device:
        return reward_head(self.model).weight.device

    @torch.no_grad()
    def forward(self, **batch) -> torch.Tensor:
        """[N] float32 rewards of a collated batch (the SFT collator's keys; float pixels), moved to the device."""
        device = self.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return reward_forward(self.model, self.model, batch)

    @torch.no_grad()
    def score(self, prompts: list, completions: list[dict], *, batch_size: int = 16) -> torch.Tensor:
        """[N] float32 rewards on the CPU of completion n (an assistant message: {"content": answer} with optional
        "reasoning_content") after prompts[n] (data.rm.PromptMedia: its messages, images and videos), in batches of
        `batch_size` rows."""
        out = []
        for start in range(0, len(prompts), batch_size):
            rows = self.rows.rows(prompts[start:start + batch_size], completions[start:start + batch_size])
            out.append(self(**self.collator(rows)).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(path, *, device=None, dtype: str = "fp32") -> RewardModel:
    """Open what `vlft rm` wrote at `path` (its output_dir or a checkpoint-N in it; full fine-tuning or LoRA) for
    scoring: the language model through vlft's shared loader (vlft.models.loading `open_trained`: a LoRA run's base,
    its fully trained weights and its adapter, merged), then the head (REWARD_HEAD_WEIGHTS) in float32; weights in
    `dtype` ("fp32", "bf16", "fp16"), on `device` (None: where the loader puts them, the CPU). The processor, media
    settings and reasoning flags are the run's own. Under a registered ZeRO-3 config the model still loads whole
    (`loading_whole`). VlftError naming the path when it is no reward-model run, or its files do not fit."""
    from types import SimpleNamespace

    from vlft.data.processor_media import media_settings_from_args
    from vlft.data.reasoning import Thinking
    from vlft.models.loading import describe_trained, load_processor, open_trained

    trained = describe_trained(str(path))
    weight = read_reward_head(path)  # before the weights load: a wrong folder fails at once
    with loading_whole():
        opened = open_trained(trained, dtype=dtype, device=device, use_cache=False)
    model = opened.model
    attach_reward_head(model, weight=weight)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    media = media_settings_from_args(opened.media, opened.family)
    if media is None:
        from vlft.config import DataArguments

        media = DataArguments().media_settings(opened.family)
    thinking = Thinking.from_args(SimpleNamespace(**{k: opened.media.get(k) for k in ("enable_thinking",
                                                                                       "preserve_thinking")}))
    processor = load_processor(opened.processor_source)
    return RewardModel(model, family=opened.family, processor=processor, media=media, thinking=thinking,
                       path=str(path))
