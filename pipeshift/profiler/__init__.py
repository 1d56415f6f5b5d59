"""profiler step (see DESIGN.md)."""
