"""The training path never imports TensorFlow (it must run where TF is not installed)."""

import subprocess
import sys

from conftest import REPO

TRAINING_MODULES = ["slw_jax.models", "slw_jax.pacing", "slw_jax.schedules", "slw_jax.plan",
                    "slw_jax.config_lib", "slw_jax.cli", "slw_jax.input_pipeline",
                    "slw_jax.trainer", "slw_jax.main", "slw_jax.monitor", "slw_jax.checkpoint",
                    "slw_jax.sharding", "slw_jax.distributed", "slw_jax.evaluate",
                    "slw_jax.tokenizers_lib", "slw_jax.report", "slw_jax.convert"]


def test_training_modules_do_not_import_tensorflow():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in TRAINING_MODULES) +
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'seqio', 'tensorflow_datasets')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"
