"""runtime step (see DESIGN.md)."""
