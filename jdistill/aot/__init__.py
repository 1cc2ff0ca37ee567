"""Ahead-of-time compiles for accelerators this machine does not have (`scripts/aot_compile.py`):
the targets and their compile-only devices (`targets`), the memory traffic of a compiled program
(`traffic`), and the report of one config on one target (`report`)."""
