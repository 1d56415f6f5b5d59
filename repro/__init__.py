"""Reproductions of published results with pipeshift's own tools.

- :mod:`repro.pipedream_table1` — PipeDream (SOSP'19) Table 1's configurations, planned from the
  profiles PipeDream published, next to the paper's.
- :mod:`repro.notation` — the paper's way of writing a configuration ("15-1", "16", "straight").

Run them from the repository root: ``python -m repro.pipedream_table1``.
"""
