"""Test-session settings. The tests compile far more than they run, so XLA is asked to compile
quickly (numerics are unchanged in kind; every comparison runs under the same flags)."""
import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()
