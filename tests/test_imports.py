"""The training path never imports TensorFlow (it must run where TF is not installed)."""

import subprocess
import sys

import pytest

from conftest import REPO

TRAINING_MODULES = ["slw_jax.models", "slw_jax.pacing", "slw_jax.optim", "slw_jax.plan",
                    "slw_jax.config_lib", "slw_jax.cli", "slw_jax.input_pipeline",
                    "slw_jax.trainer", "slw_jax.main", "slw_jax.monitor", "slw_jax.checkpoint",
                    "slw_jax.sharding", "slw_jax.distributed", "slw_jax.evaluate",
                    "slw_jax.tokenizers_lib", "slw_jax.report", "slw_jax.convert",
                    "slw_jax.parallel_encode"]
DATA_PACKAGES = "('tensorflow', 'seqio', 'tensorflow_datasets')"


@pytest.mark.slow
def test_training_modules_do_not_import_tensorflow():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in TRAINING_MODULES) +
          f"print(sorted(m for m in sys.modules if m.split('.')[0] in {DATA_PACKAGES}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


@pytest.mark.slow
def test_a_run_that_prepares_its_data_never_imports_tensorflow(tmp_path, corpus_dir):
  """The trainer prepares missing data in a child process: after a whole run that did, neither
  TensorFlow nor the preparation module was ever imported by the training process."""
  values = {"data.source": f"files:{corpus_dir}/*.txt", "data.dir": str(tmp_path / "data"),
            "train_steps": 3, "eval.every_steps": 3, "compile.cache_dir": ""}
  code = "\n".join([
      "import sys",
      f"sys.path.insert(0, {str(REPO / 'tests')!r})",
      "import conftest",
      "from slw_jax import config_lib, trainer",
      f"values = dict(conftest.TEST_RUN, **{values!r})",
      f"c = config_lib.validate(config_lib.load_config_file({str(REPO / 'configs/tiny.py')!r}, "
      "values))",
      f"summary = trainer.Trainer(c, {str(tmp_path / 'run')!r}).run()",
      "print('completed', summary['completed'])",
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      f"{DATA_PACKAGES} or m == 'slw_jax.prepare'))"])
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert any(l.startswith("prepared ") for l in lines)  # The child's lines reach the log.
  assert lines[-2:] == ["completed True", "[]"]
