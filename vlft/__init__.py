"""vlft: fine-tune Qwen vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

__version__ = "0.1.0"
