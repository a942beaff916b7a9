"""Model families, loading, freezing, LoRA and the offline tiny model."""
