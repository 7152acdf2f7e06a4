"""raylm actors layer."""
