"""Data loading: LLaVA files -> validated samples, and image loading/sizing."""
