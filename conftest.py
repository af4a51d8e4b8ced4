"""The test session's one piece of setup: a persistent compilation cache shared by every test and every
process the tests start (train.py, bench.py parts), so a program that many tests compile alike (the same
tiny model's step, evaluation, sampler) is compiled once. Fresh for each session: no state between runs,
and removed when the session that made it ends (a full run leaves ~33 MB there otherwise)."""
import os
import shutil
import tempfile

# XLA:CPU's LLVM at -O2 rather than its default -O3: the suite is mostly compiling tiny programs
# (docs/performance.md, "The test suite's time"), and -O2 compiles the tiny train step in 8.5-11 s, not 14.5-15.6 s.
# Set before JAX starts its backend; the processes the tests start inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=2").strip()

import jax  # noqa: E402

# Made only where none is set yet: pytest-xdist's workers inherit the controller's, and a cache the caller
# names (JAX_COMPILATION_CACHE_DIR set before pytest starts) is theirs to keep.
MADE_HERE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if MADE_HERE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="poolformer-test-cache-")
CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session):
    if MADE_HERE:
        shutil.rmtree(CACHE, ignore_errors=True)
