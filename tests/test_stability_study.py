"""experiments/stability/run.py in smoke mode: every arm, the tuner, the tables, the refusal of a
regime whose baseline never becomes unstable."""

import importlib.util
import json
import sys

import pytest

from conftest import REPO


def _study_module():
  spec = importlib.util.spec_from_file_location("stability_run",
                                                REPO / "experiments" / "stability" / "run.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["stability_run"] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


def _data_flags(corpus_dir, tmp_path_factory, cache_dir):
  data_dir = str(tmp_path_factory.getbasetemp() / "prepared_study")
  return ["--set", f"data.source=files:{corpus_dir}/*.txt", "--set", f"data.dir={data_dir}",
          "--set", f"compile.cache_dir={cache_dir}"]


def test_smoke_study_runs_every_arm_and_writes_the_tables(tmp_path, corpus_dir, cache_dir,
                                                          tmp_path_factory):
  run = _study_module()
  out = tmp_path / "study"
  args = ["--smoke", "--seeds=2", f"--out={out}", *_data_flags(corpus_dir, tmp_path_factory,
                                                               cache_dir)]
  rows = run.study(args)
  assert set(rows) == {(arm, 0) for arm in run.ARMS} | {("baseline", 1), ("slw", 1)}
  baseline = run.report.read_run(str(out / "baseline_seed0"))
  assert run.check_unstable(baseline, None) > 1.2  # The smoke LR blows the baseline up.
  for row in rows.values():
    assert row["steps"] > 0 and {"above_1.1", "above_1.5", "spike_score", "r_max"} <= set(row)
  text = (out / "RESULTS.md").read_text()
  for arm in run.ARMS:
    assert f"| {arm} |" in text
  assert "Headline arms over 2 seeds" in text and "Table 2 analog" in text
  assert "![loss_ratio.png](loss_ratio.png)" in text and (out / "loss_ratio.png").exists()
  tune_result = json.loads((out / "tune" / "tune_result.json").read_text())
  assert f"`{tune_result['flags']}`" in text
  slw = json.loads((out / "slw_seed0" / "summary.json").read_text())
  assert slw["completed"]
  # A rerun reuses every finished arm: nothing trains again.
  import slw_jax.trainer as trainer  # pylint: disable=g-import-not-at-top
  original, trainer.Trainer.run = trainer.Trainer.run, None  # Any training would fail.
  try:
    assert run.study(args) == rows
  finally:
    trainer.Trainer.run = original
  with pytest.raises(run.StudyError, match=r"baseline_seed0 holds a run of another regime "
                     r"\(optim.lr=3.0 there, 2.0 here\)"):
    run.study([*args, "--set", "optim.lr=2.0"])
  with pytest.raises(run.StudyError, match=r"--set optim.lr='fast' is invalid: .*'lr'"):
    run.study([*args, "--set", "optim.lr=fast"])


def test_a_regime_whose_baseline_stays_stable_is_refused(tmp_path, corpus_dir, cache_dir,
                                                         tmp_path_factory, capsys):
  run = _study_module()
  args = ["--smoke", f"--out={tmp_path}", "--set", "optim.lr=1e-6", "--set",
          "optim.min_lr=1e-7", *_data_flags(corpus_dir, tmp_path_factory, cache_dir)]
  with pytest.raises(run.StudyError, match=r"the baseline never became unstable \(max loss "
                     r"ratio [\d.]+ <= 1.2 at optim.lr=1e-06"):
    run.study(args)
  assert not (tmp_path / "tune").exists() and not (tmp_path / "slw_seed0").exists()
