"""The plan command: rows, summary and formats agree with the schedules they come from."""

import csv
import os
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from slw_jax import config_lib, optim, pacing, plan


@pytest.fixture(scope="module")
def tiny_plan():
  c = config_lib.validate(config_lib.load_config_file(str(REPO / "configs/tiny.py")))
  return c, plan.build_plan(c)


def test_rows_match_schedule_and_lr(tiny_plan):
  c, p = tiny_plan
  s = pacing.run_schedule(c)
  lr = optim.learning_rates(c, s)
  assert p["total_steps"] == s.num_steps == len(p["rows"])
  assert p["total_tokens"] == s.total_tokens >= c.train_tokens
  for row in p["rows"]:
    t = row["step"]
    assert (row["seqlen"], row["batch_size"], row["tokens"]) == (
        s.seqlen[t], s.batch_size[t], s.tokens_before[t])
    assert row["lr"] == lr[t]
  tokens = [r["tokens"] for r in p["rows"]]
  steps_tokens = [r["seqlen"] * r["batch_size"] for r in p["rows"]]
  np.testing.assert_array_equal(np.diff(tokens), steps_tokens[:-1])
  assert tokens[-1] < c.train_tokens <= tokens[-1] + steps_tokens[-1]


def test_summary_buckets_and_flops(tiny_plan):
  _, p = tiny_plan
  assert p["num_params"] == 859_264
  buckets = p["buckets"]
  assert sum(b["num_steps"] for b in buckets) == p["total_steps"]
  assert [b["seqlen"] for b in buckets] == sorted(b["seqlen"] for b in buckets)
  assert p["train_flops"] == pytest.approx(sum(b["flops"] for b in buckets))
  by_tokens = sum(b["seqlen"] * b["batch_size"] * b["num_steps"] for b in buckets)
  assert by_tokens == p["total_tokens"]
  assert 6 * p["num_params"] * p["total_tokens"] < p["train_flops"]


def test_every_n_keeps_the_last_step():
  c = config_lib.validate(config_lib.load_config_file(str(REPO / "configs/tiny.py")))
  p = plan.build_plan(c, every=100)
  steps = [r["step"] for r in p["rows"]]
  assert steps[:3] == [0, 100, 200] and steps[-1] == p["total_steps"] - 1
  with pytest.raises(ValueError, match="--every=0"):
    plan.build_plan(c, every=0)


def test_text_and_csv_render(tiny_plan):
  _, p = tiny_plan
  text, err = plan.render(p, "text")
  assert err == "" and "num_params: 859,264" in text and f"total_steps: {p['total_steps']:,}" in text
  out, summary = plan.render(p, "csv")
  rows = list(csv.DictReader(io.StringIO(out)))
  assert list(rows[0]) == list(plan.ROW_KEYS) and len(rows) == p["total_steps"]
  assert int(rows[-1]["tokens"]) == p["rows"][-1]["tokens"]
  assert "buckets:" in summary


@pytest.mark.slow
def test_cli_json_for_a_400k_step_plan():
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.plan", "--config=configs/gpt2_1p5b.py", "--format=json",
       "--every=1000", "--config.model.vocab_pad_multiple=1"], cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
  p = json.loads(result.stdout)
  assert set(p) >= {"num_params", "total_steps", "total_tokens", "buckets", "rows"}
  assert p["num_params"] == 1_557_611_200
  assert p["total_tokens"] >= 157_286_400_000 > p["rows"][-1]["tokens"]
  assert p["total_steps"] > 400_000  # SLW's short early steps take more steps to the budget.
  assert p["buckets"][0]["seqlen"] == 64 and p["buckets"][-1]["seqlen"] == 1024


# ----- plan --memory ------------------------------------------------------------------------------

MEMORY_KEYS = {"devices", "mesh", "bucket", "bytes_per_device", "gib_per_device", "compile_s",
               "microbatches", "remat", "fits", "caveat", "device_memory_gib", "attention"}


@pytest.mark.slow
def test_memory_cli_compiles_the_largest_bucket_on_simulated_devices():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # Only --devices decides.
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.plan", "--config=configs/tiny.py", "--memory",
       "--devices=2", "--device_memory_gib=0.05", "--config.optim.microbatches=auto",
       "--config.batch_size=8"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300, check=True)
  report = json.loads(result.stdout)
  assert MEMORY_KEYS <= set(report)
  assert report["devices"] == 2 and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert report["bucket"] == [8, 256] and report["fits"] is True
  assert report["bytes_per_device"] <= 0.05 * 2**30 * 0.9
  assert report["microbatches"] > 1  # 51 MiB needs more than one pass of 4 rows x 256.
  assert "XLA:CPU" in report["caveat"]


@pytest.mark.slow
def test_memory_without_devices_is_a_one_line_error():
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.plan", "--config=configs/tiny.py", "--memory"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: --devices=None is invalid: --memory needs "
                                   "--devices=N, N >= 1 (the target's device count)")


@pytest.mark.slow
def test_memory_report_remat_and_microbatches_cut_memory():
  import jax  # pylint: disable=g-import-not-at-top
  c = lambda **o: config_lib.validate(config_lib.load_config_file(  # noqa: E731
      str(REPO / "configs/tiny.py"), {"batch_size": 8, "model.n_layer": 8, **o}))
  devices = jax.devices()[:2]
  base = plan.memory_report(c(), devices, 80.0)
  remat = plan.memory_report(c(**{"model.remat": "block"}), devices, 80.0)
  split = plan.memory_report(c(**{"optim.microbatches": 4}), devices, 80.0)
  assert base["fits"] and base["microbatches"] == 1 and remat["remat"] == "block"
  assert remat["bytes_per_device"] < 0.85 * base["bytes_per_device"]  # ~0.80 measured.
  assert split["microbatches"] == 4 and split["bytes_per_device"] < 0.8 * base["bytes_per_device"]


@pytest.mark.parametrize("flags,message", [
    (["--devices=8"], "--devices=8 is only for --memory"),
    (["--memory", "--devices=1", "--device_memory_gib=nan"], "--device_memory_gib=nan is invalid"),
    (["--compile_estimate"], "--devices=None is invalid: --compile_estimate needs --devices=N"),
    (["--compile_estimate", "--devices=8", "--compile_s=-1"], "--compile_s=-1.0 is invalid"),
])
@pytest.mark.slow
def test_memory_flags_misused_are_one_line_errors(flags, message):
  result = subprocess.run([sys.executable, "-m", "slw_jax.plan", "--config=configs/tiny.py",
                           *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def _paper(name, **overrides):
  return config_lib.validate(config_lib.load_config_file(str(REPO / f"configs/{name}.py"),
                                                         overrides))


def test_plan_shows_padded_bucket_lengths_and_their_padding():
  c = _paper("tiny", **{"pacing.multiple": 8, "pacing.seqlen_start": 8,
                        "compile.pad_multiple": 64})
  built = plan.build_plan(c)
  assert [b["seqlen"] for b in built["buckets"]] == [64, 128, 192, 256]
  assert built["buckets"][0]["padding_fraction"] > 0.3  # Lengths 8..64 run at 64.
  text, _ = plan.render(built, "text")
  assert "buckets: 4 (seqlen x batch_size: first_step, steps, flops, padding)" in text


def test_compile_estimate_recommends_padding_only_when_compiles_cost_over_1_percent():
  c = _paper("gpt2_117m")
  slow = plan.compile_estimate(c, 8, compile_s=30.0, tokens_per_s=None, mfu=0.4)
  assert slow["configured"]["pad_multiple"] is None and slow["configured"]["buckets"] == 128
  assert slow["configured"]["compile_share"] > 0.01
  best = slow["recommended"]  # The least compile + padded training time.
  assert best == min(slow["options"], key=lambda o: o["compile_s"] + o["train_s"])
  assert best["pad_multiple"] == 64 and best["buckets"] == 16
  assert best["compile_share"] < 0.15 * slow["configured"]["compile_share"]
  assert best["padding_fraction"] < 0.01  # Padding only during the warmup.
  assert [o["pad_multiple"] for o in slow["options"]] == [None, 16, 32, 64, 128, 256, 512, 1024]
  fast = plan.compile_estimate(c, 8, compile_s=0.5, tokens_per_s=None, mfu=0.4)
  assert fast["recommended"]["pad_multiple"] is None  # 60 s of compiles: no padding needed.
  odd = plan.compile_estimate(_paper("gpt2_117m", **{"compile.pad_multiple": 24}), 8, 30.0,
                             None, 0.4)
  assert odd["configured"]["pad_multiple"] == 24 and odd["configured"]["buckets"] == 43
  measured = plan.compile_estimate(c, 8, None, 1e6, 0.4,
                                   measure=lambda config, devices: (lambda seqlen: 2.0, {}))
  assert measured["configured"]["compile_s"] == 256.0 and "tokens_per_s" in (
      measured["assumptions"]["rate"])
  # Queued ahead, 2 s compiles mostly overlap training: the run waits before step 0 (2 s),
  # and a little while the first buckets' steps are milliseconds long.
  assert 2.0 <= measured["configured"]["stall_s"] < 0.02 * 256.0
  assert "threads" in measured["assumptions"]["stall"]


def test_bucket_costs_count_padding_exactly():
  from slw_jax import bucket_cost  # pylint: disable=g-import-not-at-top
  schedule = pacing.Schedule(np.array([8, 16, 24, 32]), np.array([2, 2, 2, 2]),
                             np.array([0, 16, 48, 96, 160]))
  costs = bucket_cost.Costs(lambda seqlen: 10.0, lambda seqlen: 1.0, 1.0)
  option = bucket_cost.pad_option(schedule, 16, 32, costs)
  assert option.buckets == 2 and option.compile_s == 20.0
  assert option.train_s == 2 * (16 + 16 + 32 + 32)  # Padded tokens at 1 FLOP each, 1 FLOP/s.
  assert option.padding_fraction == pytest.approx(1 - 160 / 192)
  assert option.stall_s == 10.0  # Before step 0 only: the second bucket compiled meanwhile.


@pytest.mark.parametrize("threads,ahead,stall", [(1, 2, 100 + 84 + 68), (2, 2, 100 + 84),
                                                 (1, 0, 300), (4, 4, 100 + 84)])
def test_compile_stall_follows_the_trainers_background_compiles(threads, ahead, stall):
  """Four one-step buckets of 16, 32, 48 and 64 s, each compiling in 100 s: before step 0 the
  first and the largest (last) compile side by side; then reaching bucket i queues the next
  `ahead` on `threads` workers, and the run waits for any not ready when first needed
  (`ahead` 0: compiled when needed)."""
  from slw_jax import bucket_cost  # pylint: disable=g-import-not-at-top
  schedule = pacing.Schedule(np.array([8, 16, 24, 32]), np.array([2, 2, 2, 2]),
                             np.array([0, 16, 48, 96, 160]))
  step_s = np.array([16.0, 32.0, 48.0, 64.0])
  assert bucket_cost.compile_stall_s(schedule.buckets(), step_s, [100.0] * 4, threads,
                                     ahead) == stall


@pytest.mark.slow
def test_measured_compile_seconds_compile_the_shortest_and_longest_bucket(monkeypatch):
  """With one-call attention (an accelerator's fused kernel), not the CPU's blockwise loop."""
  import jax  # pylint: disable=g-import-not-at-top
  c = _paper("tiny", **{"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                        "model.max_seqlen": 64, "pacing.multiple": 8, "batch_size": 4,
                        "train_tokens": None, "train_steps": 20, "pacing.duration_steps": 10,
                        "optim.warmup_steps": 2, "pacing.seqlen_start": 16})
  seen, real = [], plan.simulated_steps
  monkeypatch.setattr(plan, "simulated_steps",
                      lambda config, *a, **k: seen.append(config.model.attention) or real(
                          config, *a, **k))
  seconds_of, measured = plan.measured_compile_seconds(c, jax.devices()[:1])
  assert sorted(measured) == [16, 64] and all(s > 0 for s in measured.values())
  assert min(measured.values()) <= seconds_of(40) <= max(measured.values())
  assert seen == ["dot_product"]


def test_plan_shows_the_published_parameter_count_beside_the_padded_one(load_config):
  """GPT-2 117M pads its vocabulary to 50,304 rows: 124,439,808 parameters as published (the
  config's docstring) plus 36,096 in the 47 padded rows; both are shown."""
  p = plan.build_plan(config_lib.validate(load_config("gpt2_117m")), every=100_000)
  assert (p["num_params"], p["published_params"], p["padded_vocab_rows"]) == (
      124_475_904, 124_439_808, 47)
  assert plan._summary_lines(p)[0] == ("num_params: 124,475,904 (124,439,808 as published, "
                                       "plus 36,096 in the 47 padded vocabulary rows)")
  tiny = plan.build_plan(config_lib.validate(load_config("tiny")))
  assert tiny["published_params"] == tiny["num_params"]
  assert plan._summary_lines(tiny)[0] == f"num_params: {tiny['num_params']:,}"
