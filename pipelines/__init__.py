"""raylm pipelines layer."""
