"""Training entry points and their shared pieces."""
