"""Reports from crafted metrics files: statistics, time to target, plots, partial files."""

import json
import math
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from conftest import REPO
from slw_jax import report


def _write_run(path, losses, nu_max, val_losses, truncate=False):
  """A metrics.jsonl with training rows (ratios as the trainer computes them) and evals."""
  path.mkdir(parents=True)
  lines, best = [], math.inf
  for step, (loss, nu) in enumerate(zip(losses, nu_max)):
    ratio = 0.0 if step == 0 else loss / best
    best = min(best, loss)
    lines.append({"step": step, "tokens": 100 * step, "seqlen": 8 + step, "batch_size": 4,
                  "lr": 1e-3, "loss": loss, "loss_ratio": ratio, "grad_norm": 1.0,
                  "adam_nu_l1": 10 * nu, "adam_nu_max": nu, "step_time_s": 0.5,
                  "tokens_per_s": 200.0, "mfu": 0.1})
    if step % 5 == 4:
      val = val_losses[step // 5]
      lines.append({"step": step + 1, "tokens": 100 * (step + 1), "val_loss": val,
                    "val_ppl": math.exp(val), "elapsed_s": 2.0 * (step + 1)})
  text = "".join(json.dumps(r) + "\n" for r in lines)
  if truncate:
    text += '{"step": 99, "tokens": 9900, "seq'  # Killed while writing.
  (path / "metrics.jsonl").write_text(text)
  return lines


LOSSES_A = [5.0, 4.0, 3.5, 4.9, 3.0, 2.9, 3.8, 2.5, 2.4, 2.3]  # Ratios 1.4 and 1.31 > 1.2.
NU_A = [1.0, 2.0, 2.5, 4.0, 2.0, 2.1, 3.5, 2.0, 1.9, 1.8]
LOSSES_B = [5.0, 4.5, 4.0, 3.6, 3.3, 3.1, 2.9, 2.8, 2.7, 2.6]


@pytest.mark.slow
def test_report_from_crafted_runs(tmp_path):
  rows_a = _write_run(tmp_path / "slw", LOSSES_A, NU_A, [3.2, 2.35])
  _write_run(tmp_path / "baseline", LOSSES_B, [1.0] * 10, [3.4, 2.8], truncate=True)
  path = report.build([str(tmp_path / "slw"), str(tmp_path / "baseline")], str(tmp_path / "out"))
  text = open(path).read()

  ratios = [r["loss_ratio"] for r in rows_a if "loss" in r][1:]
  r_max, p_max = scipy_stats.pearsonr(ratios, NU_A[1:])
  assert f"| slw | 10 | 2 | 20.00 | {max(ratios):.4g} |" in text
  assert f"{r_max:.3f} | {p_max:.2g} |" in text
  assert "| baseline | 10 | 0 | 0.00 |" in text  # The partial last line is not a step.
  # Target: 2.8, the best loss of the worse run. slw reaches it at its 2nd eval (1,000 tokens,
  # after 10 steps of 0.5 s), the baseline at its 2nd too.
  assert "Target: validation loss 2.8000." in text
  assert "| slw | 1,000 | 1.00x | 5.0 | 1.00x |" in text
  assert "| baseline | 1,000 | 1.00x | 5.0 | 1.00x |" in text
  assert "- slw: step 10: val_loss 2.35" in text
  for name in report.PLOTS:
    assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![{name}]({name})" in text


def test_time_to_target_ratio_against_the_first_run(tmp_path):
  _write_run(tmp_path / "fast", LOSSES_B, [1.0] * 10, [2.55, 2.5])
  _write_run(tmp_path / "slow", LOSSES_B, [1.0] * 10, [3.0, 2.6])
  runs = [str(tmp_path / d) for d in ("fast", "slow")]
  target, reached = report.time_to_target([report.read_run(d) for d in runs])
  assert target == 2.6
  assert reached == {"fast": (500, 2.5), "slow": (1000, 5.0)}
  text = open(report.build(runs, str(tmp_path / "out"))).read()
  assert "| slow | 1,000 | 2.00x | 5.0 | 2.00x |" in text


def test_non_finite_values_and_sampled_steps(tmp_path):
  rows = _write_run(tmp_path / "diverged", LOSSES_B, [1.0] * 10, [3.0, 2.9])
  rows[2].update(loss="nan", loss_ratio="nan", adam_nu_max="inf")  # As the trainer writes them.
  rows[5]["val_loss"] = rows[5]["val_ppl"] = "nan"
  del rows[7]  # A step that was not logged.
  (tmp_path / "diverged" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                               for r in rows))
  _write_run(tmp_path / "ok", LOSSES_B, [1.0] * 10, [3.1, 2.95])
  runs = [str(tmp_path / d) for d in ("diverged", "ok")]
  target, reached = report.time_to_target([report.read_run(d) for d in runs])
  assert target == 2.95 and reached["diverged"] == (1000, 4.5)  # The NaN eval is ignored.
  text = open(report.build(runs, str(tmp_path / "out"))).read()
  assert "diverged logged 9 of steps 0-9" in text


def test_corrupt_middle_line_and_missing_metrics_are_clear_errors(tmp_path):
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON object"):
    report.read_run(str(tmp_path / "bad"))
  result = subprocess.run([sys.executable, "-m", "slw_jax.report", str(tmp_path / "none"),
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == (f"error: {str(tmp_path / 'none')!r} has no metrics.jsonl: "
                                   "pass run directories written by python -m slw_jax.main "
                                   "--workdir=DIR")


@pytest.mark.slow
def test_report_command_line(tmp_path):
  _write_run(tmp_path / "run", LOSSES_A, NU_A, [3.2, 2.35])
  (tmp_path / "run" / "eval").mkdir()
  (tmp_path / "run" / "eval" / "val.json").write_text(json.dumps({"loss": 2.3, "ppl": 9.97}))
  result = subprocess.run([sys.executable, "-m", "slw_jax.report", str(tmp_path / "run"),
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "wrote" in result.stdout
  assert '  - val: {"loss": 2.3, "ppl": 9.97}' in open(tmp_path / "out" / "report.md").read()
