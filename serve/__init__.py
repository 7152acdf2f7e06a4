"""raylm serve layer."""
