"""Constants shared by data and model code."""

IGNORE_INDEX = -100  # label value that the loss ignores

# LLaVA placeholders in human turns
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

# Qwen special tokens (same strings in Qwen2-VL, Qwen2.5-VL and Qwen3-VL)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"

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

# 2U1/Qwen2-VL-Finetune defaults for image pixel budgets
DEFAULT_IMAGE_MIN_PIXELS = 3136
DEFAULT_IMAGE_MAX_PIXELS = 12845056
# 2U1's per-frame video budgets (128 and 768 tokens of 28x28 pixels)
DEFAULT_VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_VIDEO_MAX_PIXELS = 768 * 28 * 28
# All frames of one video together: at most 4096 tokens of 28x28 pixels x 2 frames, half the default
# --max_seq_length, so one long video cannot push a record over the limit by itself.
DEFAULT_VIDEO_MAX_TOTAL_PIXELS = 4096 * 28 * 28 * 2
