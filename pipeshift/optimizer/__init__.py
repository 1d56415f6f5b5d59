"""optimizer step (see DESIGN.md)."""
