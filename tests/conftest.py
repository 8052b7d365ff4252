"""Session settings for the whole suite.

OpenMP threads sleep instead of spinning on CPU-only hosts (as the `nanoflow` command does, see
nanoflow.entrypoints.cli.passive_openmp_env): CI machines are shared, and on a busy 2-core machine the
suite took 216 s with spinning threads and 158 s without. This runs before any test imports torch."""
import os
import sys
from pathlib import Path

from nanoflow.entrypoints.cli import passive_openmp_env

os.environ.update(passive_openmp_env(os.environ, gpu_present=Path("/dev/nvidiactl").exists(),
                                     torch_loaded="torch" in sys.modules))
