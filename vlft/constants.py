"""Constants shared by data and model code."""

IGNORE_INDEX = -100  # label value that the loss ignores

# LLaVA placeholders in human turns
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

# Qwen special tokens (same strings in Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5, whose Qwen3_5Tokenizer has a
# larger vocabulary and other ids: always look the ids up in the tokenizer)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"
# A generated reply ends at the first of these: <|im_end|> closes a chat turn, <|endoftext|> a document (a base
# checkpoint's eos).
END_OF_REPLY_TOKENS = (IM_END, ENDOFTEXT)
# Vision structure a generated reply must never hold: a placeholder without pixels breaks the next forward.
VISION_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, VISION_PAD)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Text that must not appear literally in user data: it would be read as structure. The two
# private-use characters mark assistant spans while labels are built (data/sft.py).
RESERVED_STRINGS = (*QWEN_SPECIAL_TOKENS, "\ue000", "\ue001")

# LLaVA role names -> chat-template roles
ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# Default pixel budgets, as LLM tokens: one token covers a square of the family's `pixel_factor` pixels per side
# (patch x merge: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL), so the budget in pixels is the count times
# pixel_factor**2 (`Family.default_pixel_budgets`) and every family gets the same number of tokens.
# 2U1/Qwen2-VL-Finetune's image budgets, 3136 and 12845056 pixels in 28x28 units:
DEFAULT_IMAGE_MIN_TOKENS = 4
DEFAULT_IMAGE_MAX_TOKENS = 16384
# 2U1's per-frame video budgets (qwen-vl-utils' defaults):
DEFAULT_VIDEO_MIN_TOKENS = 128
DEFAULT_VIDEO_MAX_TOKENS = 768
# All frames of one video together: the pixels summed over its temporal patches (two frames make one), so a video
# has at most this many tokens (vlft.data.video), the default --max_seq_length, unless the per-frame minimum wins
# (beyond about 2 * 8192 / 128 = 128 frames); a longer record is dropped or reported like any over-long one.
DEFAULT_VIDEO_MAX_TOTAL_TOKENS = 8192
