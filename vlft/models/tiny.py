"""The embedded default model: a tiny, randomly initialised Qwen-VL built entirely offline.

Tests and the demo use it so that nothing is downloaded; it is saved as an ordinary model
directory, so it goes through exactly the same loading code as a real checkpoint.

    vlft tiny-model .cache/vlft/tiny-qwen2_vl --family qwen2_vl
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from vlft.constants import ENDOFTEXT, IM_END, IMAGE_PAD, QWEN_SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START
from vlft.models.registry import get_family
from vlft.utils import FlagParser, log

PATCH = 8  # vision patch size (real models: 14 or 16); small so tiny images give a few tokens
MERGE = 2  # spatial merge size, as in the real models
TEMPORAL_PATCH = 2
MIN_PIXELS = (2 * PATCH * MERGE) ** 2
MAX_PIXELS = (8 * PATCH * MERGE) ** 2


def tiny_families() -> tuple[str, ...]:
    """The model types `vlft tiny-model` can build: every family of the table (vlft/models/families/)."""
    from vlft.models.registry import FAMILIES

    return tuple(FAMILIES)


FAMILIES = tiny_families()

# The BPE is trained on this text so that the demo data tokenises into few tokens.
_CORPUS = """You are a helpful assistant. You are a careful visual assistant.
Describe the image. What is in the picture? What colour is the shape? What shape is it?
The image shows a red square on a blue background. A green circle on a white background.
A blue triangle on a white background. A gray gradient from dark to light. A yellow square on black.
An arrow pointing up. An orange cat with pointy ears. Compare the two images. How many images are there?
The first image is red and the second image is green. There are two images. There are three images.
What happens in the video? A ball moves from left to right. Which one is larger? Which way does it point?
Answer in one word. Yes. No. Red. Green. Blue. Yellow. Orange. Gray. Square. Circle. Triangle. Cat. Up.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Thank you! You are welcome. Tell me a fact. Water boils at one hundred degrees Celsius at sea level.
The quick brown fox jumps over the lazy dog. 0123456789 , . ? ! : ; ' " ( ) [ ] { } - + = / * # @ & % $
user assistant system image video picture frame left right top bottom small large colour color
"""


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    return get_family(family)


def chat_template_names() -> tuple[str, ...]:
    """The Qwen chat templates TRL ships as package files (`--chat_template` of `vlft tiny-model`)."""
    files = importlib.resources.files("trl").joinpath("chat_templates")
    return tuple(sorted(f.name.removesuffix(".jinja") for f in files.iterdir()
                        if f.name.startswith("qwen") and f.name.endswith(".jinja")))


def load_chat_template(family: str, name: str | None = None) -> str:
    """The official Qwen chat template `name` (default: the family's), as shipped in TRL's package data."""
    name = name or _family(family).tiny.chat_template
    path = importlib.resources.files("trl").joinpath(f"chat_templates/{name}.jinja")
    if not path.is_file():
        raise ValueError(f"TRL ships no chat template {name!r}; choose one of {', '.join(chat_template_names())}")
    return path.read_text()


def build_tokenizer(family: str = "qwen2_vl", vocab_size: int = 640, chat_template: str | None = None):
    """Byte-level BPE trained on a small corpus, wrapped as the family's tokenizer class (Qwen2Tokenizer, or
    Qwen3_5Tokenizer for Qwen3.5), with the Qwen special tokens after the regular vocabulary (as in the real
    tokenizer) and the family's added tokens (`<think>`, `</think>`). `chat_template`: a TRL template name."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    fam = _family(family)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    Tokenizer = getattr(transformers, fam.tokenizer_class)
    tok = Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    if fam.tiny.extra_tokens:
        tok.add_tokens(list(fam.tiny.extra_tokens))
    tok.eos_token = IM_END
    tok.pad_token = ENDOFTEXT
    tok.chat_template = load_chat_template(family, chat_template)
    tok.model_max_length = 32768
    return tok


def build_processor(family: str, tokenizer):
    import transformers
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
    )
    video_size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS * 4}
    common = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, size=video_size)
    fam = _family(family)  # an unknown family fails here, naming the tiny ones
    Processor = getattr(transformers, fam.processor_class)
    VideoProcessor = getattr(transformers, fam.video_processor_class)
    return Processor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=VideoProcessor(**common),
        chat_template=tokenizer.chat_template,
    )


def build_model(family: str, tokenizer, *, hidden: int = 64, layers: int = 2, vision_depth: int = 2,
                vision_hidden: int = 32, seed: int = 0, initializer_range: float = 0.2):
    """A randomly initialised model of about 0.2M parameters whose config matches the tokenizer; the family's
    descriptor (`Family.tiny`) adds its own text and vision fields (mRoPE, layer kinds, experts, deepstack)."""
    import torch
    import transformers

    fam = _family(family)

    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids(VISION_START),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids(VISION_END),
    }
    heads = 4
    head_dim = hidden // heads
    text = dict(
        vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=tokenizer.pad_token_id,
        # Wider than the usual 0.02: with a frozen final norm and head (LoRA), a 64-wide model initialised at
        # 0.02 cannot reach logits sharp enough to memorise the demo, so its loss would stall near ln(vocab).
        initializer_range=initializer_range,
    )
    text.update(fam.tiny.text(hidden, layers, heads, head_dim))
    vision = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
                  depth=vision_depth, num_heads=2, **fam.tiny.vision(hidden, vision_hidden, vision_depth))
    Model = getattr(transformers, fam.model_class)
    Config = Model.config_class
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = Model(config).to(torch.float32)
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(out_dir: str | os.PathLike, family: str = "qwen2_vl", *, seed: int = 0,
                    exist_ok: bool = False, chat_template: str | None = None) -> Path:
    """Build and save model + processor to `out_dir`. Written to a temporary sibling first and renamed,
    so a crash or a concurrent caller never leaves a half-written directory."""
    from vlft.errors import VlftError

    out = Path(out_dir)
    if out.exists():
        if exist_ok and (out / "config.json").exists():
            found = json.loads((out / "config.json").read_text()).get("model_type")
            if found != family:  # reusing it would hand a caller asking for `family` another model
                raise VlftError(f"{out} already holds a tiny {found} model, not {family}; choose another directory "
                                "for this family or remove it")
            return out
        if exist_ok:  # --exist_ok is set: it reuses a model, and this is not one
            raise VlftError(f"{out} already exists but holds no model (no config.json) to reuse; choose another "
                             "directory or remove it")
        raise VlftError(f"{out} already exists; choose another directory (or pass --exist_ok to reuse it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = build_tokenizer(family, chat_template=chat_template)
        build_processor(family, tok).save_pretrained(tmp)
        build_model(family, tok, seed=seed).save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (exist_ok and (out / "config.json").exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="vlft tiny-model", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to create")
    parser.add_argument("--family", default="qwen2_vl", choices=FAMILIES)
    parser.add_argument("--chat_template", default=None, choices=chat_template_names(),
                        help="one of TRL's Qwen chat templates (default: the family's, e.g. qwen3_5_think for Qwen3.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exist_ok", action="store_true", help="reuse the directory if it already holds a model")
    args = parser.parse_args(argv)
    out = save_tiny_model(args.out_dir, args.family, seed=args.seed, exist_ok=args.exist_ok,
                          chat_template=args.chat_template)
    log(f"tiny {args.family} model in {out}")
    return 0
