"""pytest setup: the XLA compilation cache, a per-session tfds data dir, the quick tier's
compile options. The tests' helpers live in `helpers/` (`from helpers.paths import REPO`)."""

import os

import pytest

# One persistent XLA compilation cache for the whole suite, its xdist workers and the CLI
# subprocesses they start (they inherit the environment): a run that resumes, a re-run after a
# signal and the same detector in another test load their programs instead of compiling them.
# Set before any test module imports jax; entries are keyed by program, options and jax version.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"jdistill-test-xla-cache-{os.getuid()}"),
)


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
    """Prepared data sets go to a temporary dir for the whole session (one per xdist worker)."""
    path = os.environ.get("JDISTILL_TEST_TFDS_DIR") or str(tmp_path_factory.mktemp("tfds"))
    os.environ["TFDS_DATA_DIR"] = path
    return path


def pytest_configure(config):
    """The quick tier (`-m "not slow"`) compiles with XLA's optimisation passes off: on its tiny
    models the passes cost more compile time than they save (a GFL loss and gradient: 19 s to
    compile and run instead of 55 s). The full suite keeps JAX's defaults for every test: its
    end-to-end runs train for many steps, unoptimised programs run several times slower, and
    one setting per session keeps a program shared by two tests compiled one way."""
    if "not slow" in (config.getoption("markexpr") or ""):
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
