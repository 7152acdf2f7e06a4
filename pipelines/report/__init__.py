"""The run report: one self-contained HTML page and a markdown twin built from a run directory."""
