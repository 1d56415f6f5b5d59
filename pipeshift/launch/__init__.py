"""launch step (see DESIGN.md)."""
