"""The family table's import point for the rest of vlft: `config.model_type` -> its descriptor.

The descriptors live in vlft/models/families/ (one module per family); the family is always read from the
checkpoint's config, never guessed from its path.
"""
from vlft.models.families import FAMILIES, Family, MoELayout, TextShape, VisionShape, family_available, get_family

__all__ = ["FAMILIES", "Family", "MoELayout", "TextShape", "VisionShape", "family_available", "get_family"]
