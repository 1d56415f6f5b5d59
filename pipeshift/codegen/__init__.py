"""codegen step (see DESIGN.md)."""
