"""experiments/stability: the LR-sweep study in smoke mode (every stage, table and plot, reuse,
recomputation from the records alone), its statistics on hand-made records, and its bad input."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

STUDY_DIR = REPO / "experiments" / "stability"


def _study_module():
  spec = importlib.util.spec_from_file_location("stability_run", STUDY_DIR / "run.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["stability_run"] = module
  spec.loader.exec_module(module)
  return module


def _data_flags(corpus_dir, tmp_path_factory, cache_dir):
  data_dir = str(tmp_path_factory.getbasetemp() / "prepared_study")
  return ["--set", f"data.source=files:{corpus_dir}/*.txt", "--set", f"data.dir={data_dir}",
          "--set", f"compile.cache_dir={cache_dir}"]


SECTIONS = ("## Final validation loss against the learning rate", "## Per arm: LR sensitivity",
            "## The noise floor", "## Seeds at the 2 LRs", "## Tables 1 and 3 at every LR",
            "## The mechanism", "## Equal cost", "## The tuner's choice and cost",
            "## Adaptive pacing against the tuned schedule")
PLOTS = ("lr_sweep.png", "equal_cost.png", "mechanism.png", "adaptive_lengths.png")


@pytest.mark.slow
def test_smoke_study_runs_every_stage_and_recomputes_from_its_records(
    tmp_path, corpus_dir, cache_dir, tmp_path_factory):
  run = _study_module()
  out, results = tmp_path / "runs", tmp_path / "results" / "RESULTS.md"
  args = ["--smoke", "--arms=baseline,slw,adaptive,slw_tuned", "--seeds=2", "--max-seeds=2",
          "--noise-seeds=2", f"--out={out}", f"--results={results}",
          *_data_flags(corpus_dir, tmp_path_factory, cache_dir)]
  pts = run.study(args)
  lrs, arms = run.regime.PRESETS["smoke"][1], ("baseline", "slw", "adaptive", "slw_tuned")
  decided = run.analysis.plan(pts, lrs, arms, 2, 2, 2, run.regime.NOISE_TARGET)
  assert decided.seeds == 2 and len(decided.extra) == 3 and len(decided.seed_lrs) == 2
  expected = run.analysis.expected_runs(decided, lrs, arms, 2, run.regime.SWEEP_ARMS)
  assert set(pts) == set(expected)  # Every stage ran, and nothing else did.
  assert {(arm, lr, 1) for arm in arms for lr in decided.seed_lrs} <= set(pts)
  text = results.read_text()
  for section in SECTIONS:
    assert section in text, section
  for plot in PLOTS:
    assert f"![{plot}]({plot})" in text and (results.parent / plot).stat().st_size > 0
  records_dir = results.parent / "records"
  probes = sorted(records_dir.glob("mechanism_len*.json.gz"))
  assert [p.name for p in probes] == [f"mechanism_len{n}_lr{decided.probe_lr:g}.json.gz"
                                      for n in (32, 64, 8)]
  assert len(list(records_dir.glob("tune_lr*.json.gz"))) == len(decided.extra)
  # A rerun reuses every recorded run: nothing trains again.
  import slw_jax.trainer as trainer  # pylint: disable=g-import-not-at-top
  original, trainer.Trainer.run = trainer.Trainer.run, None  # Any training would fail.
  try:
    assert run.study(args) == pts
  finally:
    trainer.Trainer.run = original
  # Every table and plot is recomputed from the records alone: the run directories can go.
  shutil.rmtree(out)
  (results.parent / "lr_sweep.png").unlink()
  results.write_text("")
  assert run.study([f"--results={results}", "--analyse"]) == pts
  assert results.read_text() == text and (results.parent / "lr_sweep.png").exists()
  # Another regime is refused before anything trains: by the records' regime.json, and
  # without it by the record itself.
  other = [*args, "--set", "optim.b2=0.99", f"--out={tmp_path / 'other'}"]
  with pytest.raises(run.StudyError, match=r"--results=.*records holds runs of another regime "
                     r"\(optim.b2=0.999 there, 0.99 here\)"):
    run.study(other)
  (records_dir / "regime.json").unlink()
  with pytest.raises(run.StudyError, match=r"baseline_lr0.001_seed0.json.gz is a run of another "
                     r"regime \(optim.b2=0.999 there, 0.99 here\)"):
    run.study(other)


def _record(records, arm, lr, seed, final, first_loss=5.5, diverged=None):
  steps = {"step": [0, 1], "tokens": [0, 64], "seqlen": [8, 8], "batch_size": [8, 8],
           "lr": [lr, lr], "loss": [first_loss, final or 9.0], "loss_ratio": [0.0, 1.0],
           "grad_norm": [1.0, 1.0], "adam_nu_l1": [1.0, 1.0], "adam_nu_max": [0.1, 0.1],
           "step_time_s": [0.1, 0.1], "flops": [1.0, 2.0]}
  return records.Record(f"{arm}_lr{lr:g}_seed{seed}", "sweep", arm, lr, seed, {},
                        {"completed": diverged is None, "diverged": diverged,
                         "final_val_loss": final}, steps,
                        {"step": [2], "tokens": [128], "val_loss": [final or 9.0]})


def test_lr_sensitivity_ranges_and_chosen_lrs_follow_their_definitions():
  run = _study_module()
  a, recs = run.analysis, run.records
  lrs = (0.001, 0.01, 0.1, 1.0)
  finals = {0.001: 4.0, 0.01: 3.0, 0.1: 3.5, 1.0: None}  # 1.0 diverged.
  records = {str(lr): _record(recs, "baseline", lr, 0, f, diverged=None if f else "boom")
             for lr, f in finals.items()}
  pts = a.points(records)
  sweep = a.at_seed0(pts, "baseline")
  # Wortsman et al.: mean of min(final, init) over the sweep minus the best final loss; the
  # diverged run counts at the loss at initialization (5.5).
  assert a.lr_sensitivity(sweep) == pytest.approx((4.0 + 3.0 + 3.5 + 5.5) / 4 - 3.0)
  assert a.lr_sensitivity(sweep, (0.01, 0.1)) == pytest.approx(0.25)
  assert a.best(sweep).lr == 0.01 and a.largest_stable(sweep) == 0.1
  assert a.extra_lrs(lrs, sweep) == (0.01, 0.1, 1.0)  # Best, largest stable, next one up.
  assert a.first_unstable(lrs, sweep) == 1.0
  assert a.first_unstable((0.001, 0.01, 0.1, 1.0, 3.0), sweep) == 1.0  # Not the largest.
  assert a.first_unstable((0.001, 0.01), sweep) == 0.01  # None unstable: the largest.
  # A run ending within 10% of its initial loss is not stable (5.0 > 0.9 * 5.5).
  near = {**records, "x": _record(recs, "baseline", 0.1, 0, 5.0)}
  assert a.largest_stable(a.at_seed0(a.points(near), "baseline")) == 0.01
  # When the best is the largest stable, the next LRs up fill the three places.
  top = {str(lr): _record(recs, "baseline", lr, 0, f, diverged=None if f else "boom")
         for lr, f in {0.001: 4.0, 0.01: 3.5, 0.1: 3.0, 1.0: None}.items()}
  assert a.extra_lrs(lrs, a.at_seed0(a.points(top), "baseline")) == (0.01, 0.1, 1.0)
  # The seed stage: enough seeds that a mean's standard error is at most the target.
  assert a.needed_seeds(0.02, 3, 0.03, 8) == 3 and a.needed_seeds(0.06, 3, 0.03, 8) == 4
  assert a.seeds_for_target(0.074, 0.03) == 7
  assert a.needed_seeds(0.3, 3, 0.03, 8) == 8
  # The 2 LRs where the arms spread most.
  other = {f"slw{lr}": _record(recs, "slw", lr, 0, f) for lr, f in
           {0.001: 4.0, 0.01: 3.0, 0.1: 3.4, 1.0: 3.6}.items()}
  assert a.seed_lrs(a.points({**records, **other}), lrs, ("baseline", "slw")) == (0.1, 1.0)


def _about(lrs, arms):
  return {"command": "python experiments/stability/run.py --smoke", "preset": "smoke",
          "slw_steps": 4, "machine": "test", "lrs": list(lrs), "arms": list(arms), "seeds": 1,
          "noise_seeds": 1, "max_seeds": 1,
          "regime": {"model.n_layer": 1, "model.d_model": 32, "model.max_seqlen": 64,
                     "batch_size": 8, "train_tokens": 128, "optim.warmup_tokens": 10,
                     "optim.b2": 0.999, "optim.clip_norm": 1.0, "eval.batches": 1,
                     "eval.batch_size": 8}}


@pytest.mark.slow
def test_analyse_refuses_an_unfinished_study_and_reads_one_where_everything_diverged(tmp_path):
  run = _study_module()
  recs, results = run.records, tmp_path / "RESULTS.md"
  records_dir = tmp_path / "records"
  with pytest.raises(run.StudyError, match=r"records holds no study \(study.json missing\)"):
    run.study([f"--results={results}", "--analyse"])
  lrs = (0.1, 1.0, 10.0)
  records_dir.mkdir()
  (records_dir / "study.json").write_text(__import__("json").dumps(_about(lrs, ["baseline"])))
  for lr in lrs[:2]:
    recs.write(str(records_dir), _record(recs, "baseline", lr, 0, None, diverged="boom"))
  with pytest.raises(run.StudyError, match=r"lacks 1 run\(s\) of its study \(first: "
                     r"baseline_lr10_seed0\): rerun `python experiments/stability/run.py"):
    run.study([f"--results={results}", "--analyse"])
  recs.write(str(records_dir), _record(recs, "baseline", 10.0, 0, None, diverged="boom"))
  run.study([f"--results={results}", "--analyse"])
  text = results.read_text()
  assert "| baseline | div | div | div |" in text and "Stability study" in text


def test_every_arm_has_a_valid_config_that_changes_what_it_says():
  run = _study_module()
  c = run.config_lib.validate(run.config_lib.load_config_file(
      str(REPO / "configs" / "tiny.py"), run.regime.regime_overrides("cpu")))
  expect = {"baseline": {}, "slw": {"pacing.kind": "linear", "pacing.seqlen_start": 8},
            "qk_norm": {"model.qk_norm": True}, "z_loss": {"optim.z_loss": 1e-4},
            "slw_tuned": {"pacing.kind": "linear", "pacing.seqlen_start": 32,
                          "pacing.duration_steps": 70},
            "shortformer": {"pacing.kind": "discrete", "pacing.stages": ((32, 74),)},
            "batch_warmup": {"batch_warmup.start": 4},
            "slw+qk_norm": {"pacing.kind": "linear", "model.qk_norm": True},
            "adaptive": {"pacing.kind": "adaptive", "pacing.seqlen_start": 8,
                         "pacing.adaptive.backoff": False},
            "adaptive_fast": {"pacing.kind": "adaptive", "pacing.adaptive.every_steps": 10},
            "adaptive+backoff": {"pacing.kind": "adaptive", "pacing.adaptive.backoff": True}}
  assert set(expect) == set(run.regime.ARMS)
  for arm, fields in expect.items():
    arm_c = run.config_lib.with_overrides(c, run.regime.arm_overrides(c, arm, 0.05, (32, 70)))
    flat = run.records.flat_config(arm_c)
    assert flat["optim.lr"] == 0.05 and flat["optim.min_lr"] == pytest.approx(0.005)
    for key, value in fields.items():
      assert flat[key] == (list(map(list, value)) if key == "pacing.stages" else value), arm
  # The regime is the paper's aggressive recipe in ratio.
  assert c.optim.warmup_tokens == int(0.08 * c.train_tokens) and c.optim.b2 == 0.999
  assert c.train_tokens // (c.batch_size * c.model.max_seqlen) >= 150
  assert c.model.max_seqlen >= 32 * run.regime.SLW_START and c.optim.clip_norm == 1.0
  # The GPU preset (issue 23 item 6): every arm's config is valid before a device is used.
  gpu = run.regime_config(run.parse_args(["--preset=gpu", "--out=/nonexistent"]))
  assert (gpu.model.n_layer, gpu.model.d_model, gpu.model.max_seqlen) == (6, 384, 1024)


@pytest.mark.parametrize("flags, message", [
    (["--lrs=0.1,0.01,1"], r"--lrs='0.1,0.01,1' is invalid: give at least 3 finite positive "
                           r"learning rates in strictly increasing order"),
    (["--lrs=0.001,nan,1"], r"--lrs='0.001,nan,1' is invalid: give at least 3 finite"),
    (["--lrs=0.01,0.1,inf"], r"--lrs='0.01,0.1,inf' is invalid: give at least 3 finite"),
    (["--lrs="], r"--lrs='' is invalid: give comma-separated numbers"),
    (["--arms="], r"--arms='' is invalid .*baseline must be one of them"),
    (["--lrs=0.01,0.1"], r"--lrs='0.01,0.1' is invalid: give at least 3"),
    (["--lrs=0.01,fast,1"], r"--lrs='0.01,fast,1' is invalid: give comma-separated numbers"),
    (["--arms=baseline,slw_fast"], r"--arms='baseline,slw_fast' is invalid \('slw_fast'\): "
                                   r"allowed arms are baseline, slw, qk_norm"),
    (["--arms=slw"], r"--arms='slw' is invalid .*baseline must be one of them"),
    (["--set", "model.qk_norm=1"], r"--set model.qk_norm=1 is invalid: .*1 is of original type "
                                    r"<class 'int'> and cannot be casted to type <class 'bool'>"),
    (["--set", "optim.z_loss=-0.1"], r"config.optim.z_loss=-0.1 is invalid: must be a number >= 0"),
    (["--seeds=0"], r"--seeds=0 is invalid: must be >= 1"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, flags, message):
  proc = subprocess.run([sys.executable, str(STUDY_DIR / "run.py"), "--smoke",
                         f"--out={tmp_path}", *flags], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert re.search(message, lines[0]), lines[0]
  assert not list(tmp_path.iterdir())  # Refused before the regime is even recorded.


def test_an_out_or_records_of_another_regime_are_refused_before_any_training(tmp_path):
  run = _study_module()
  out, results = tmp_path / "out", tmp_path / "res" / "RESULTS.md"
  args = run.parse_args(["--smoke", f"--out={out}", f"--results={results}"])
  fingerprint = run.regime_fingerprint(run.regime_config(args))
  run.check_regime(str(out), "--out", fingerprint)
  other = ["--smoke", f"--results={results}", "--set", "model.d_model=48"]
  with pytest.raises(run.StudyError, match=rf"--out={out} holds runs of another regime "
                     r"\(model.d_model=32 there, 48 here\): use a new --out"):
    run.study([*other, f"--out={out}"])
  assert [p.name for p in out.iterdir()] == ["regime.json"] and not results.parent.exists()
  records_dir = results.parent / "records"  # The records beside --results, with a new --out.
  run.check_regime(str(records_dir), "--results", fingerprint)
  with pytest.raises(run.StudyError, match=rf"--results={records_dir} holds runs of another "
                     r"regime \(model.d_model=32 there, 48 here\)"):
    run.study([*other, f"--out={tmp_path / 'new_out'}"])
  assert [p.name for p in records_dir.iterdir()] == ["regime.json"]
