"""Helpers the tests import (`from helpers.<module> import ...`); pytest puts tests/ on sys.path.

- `paths`: the checkout (REPO), the shared data sets, configs as the CLI loads them, CLI env.
- `batches`: crafted training batches and image-validity batches.
- `distill`: detector specs, feature maps, taps and checks for calling distillers directly.

They live here rather than in conftest.py so that conftest.py holds only what pytest itself
needs, and scripts that tests start as subprocesses can import them without pytest's hooks.
"""
