"""benchmarks/torch_peer.py, the plain-PyTorch GPT-2 step our JAX step is timed against.

Tiny shapes on the CPU. The CLI runs in subprocesses where its exit status and stdout are what
is tested; the rest calls `measure` / `main` in this process (one torch import, not one a test).
"""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from conftest import REPO  # noqa: E402  pylint: disable=wrong-import-position

SCRIPT = REPO / "benchmarks" / "torch_peer.py"
VOCAB = 256
# 2 layers, width 64, 2 heads, vocabulary 256 padded to 384, 4 rows of 32 tokens.
TINY = {"n_layer": 2, "d_model": 64, "n_head": 2, "vocab_size": VOCAB, "max_seqlen": 64,
        "vocab_pad_multiple": 384, "rows": 4, "seqlen": 32}


def _load_peer():
  spec = importlib.util.spec_from_file_location("torch_peer", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["torch_peer"] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


peer = _load_peer()


def _flags(settings: dict) -> list[str]:
  return [f"--{name}={value}" for name, value in settings.items()]


def _run_cli(*flags, timeout=120):
  return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, check=False)


def _jax_model(**overrides):
  """(slw_jax.models, its GPTConfig at TINY's shapes with the vocabulary padded to 128)."""
  from slw_jax import models  # pylint: disable=import-outside-toplevel
  shapes = {k: TINY[k] for k in ("vocab_size", "n_layer", "d_model", "n_head", "max_seqlen")}
  shapes.update(vocab_pad_multiple=128)
  return models, models.GPTConfig(**{**shapes, **overrides})


@pytest.mark.slow
def test_cli_prints_one_json_line_with_our_jax_models_parameter_count(tmp_path):
  out = tmp_path / "peer.json"
  proc = _run_cli(*_flags(TINY), "--vocab_pad_multiple=128", "--steps=2", "--warmup=1",
                  "--no_compile", "--device=cpu", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  assert json.loads(out.read_text()) == result
  assert "error" not in result
  assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
  assert result["losses_finite"] and result["tokens_per_s"] > 0
  assert result["model_flops_per_s"] > 0 and result["step_s_min"] <= result["step_s_median"]
  assert result["device"] == "cpu" and result["compile"] is False
  assert result["peak_memory_bytes"] is None
  models, cfg = _jax_model()
  n_params = models.num_params(cfg)
  assert result["n_params"] == n_params
  assert result["flops_per_token"] == models.train_flops_per_token(cfg, TINY["seqlen"], n_params)


@pytest.mark.parametrize("vocab_size, pad_multiple", [(250, 128), (256, 384), (256, 1)])
def test_parameter_count_matches_our_jax_model_with_the_vocabulary_padded(vocab_size,
                                                                         pad_multiple):
  # 256 is a multiple of 128 (the CLI test's shapes): these cases pad for real.
  models, cfg = _jax_model(vocab_size=vocab_size, vocab_pad_multiple=pad_multiple)
  peer_cfg = peer.PeerConfig(**dict(TINY, vocab_size=vocab_size,
                                    vocab_pad_multiple=pad_multiple))
  assert peer.num_params(peer.GPT(peer_cfg)) == models.num_params(cfg)


def test_first_loss_is_ln_vocab_so_padded_logits_do_not_score():
  # Padded to 384: a loss near ln(384) = 5.95 rather than ln(256) = 5.55 would mean the 128
  # padded columns take probability mass.
  result = peer.measure(**TINY, steps=1, warmup=0, compile=False, device="cpu")
  assert abs(result["losses"][0] - math.log(VOCAB)) < 0.3, result["losses"]


def test_training_the_same_batch_at_a_higher_lr_lowers_the_loss():
  # At the default lr 1e-4 ten steps lower the loss by ~0.25; at 3e-3 by ~2.
  result = peer.measure(**TINY, steps=10, warmup=0, lr=3e-3, compile=False, device="cpu")
  losses = result["losses"]
  assert "error" not in result and len(losses) == 10
  assert losses[-1] < losses[0] - 1.0, losses


def test_bfloat16_autocast_runs_on_the_cpu():
  result = peer.measure(**TINY, steps=1, warmup=0, dtype="bfloat16", compile=False,
                        device="cpu")
  assert result["dtype"] == "bfloat16" and result["losses_finite"], result
  assert abs(result["losses"][0] - math.log(VOCAB)) < 0.3


@pytest.mark.slow
def test_compiled_step_runs_on_the_cpu():
  # torch.compile with inductor (it builds C++ with gcc): 30-60 s cold on a 2-core machine,
  # a few seconds once inductor's cache under /tmp holds these graphs. The smallest shapes
  # that still have every kind of layer.
  proc = _run_cli("--n_layer=1", "--d_model=32", "--n_head=2", f"--vocab_size={VOCAB}",
                  "--max_seqlen=64", "--rows=2", "--seqlen=16", "--steps=1", "--warmup=1",
                  "--compile", "--device=cpu", timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  assert result["compile"] is True and result["losses_finite"], result


@pytest.mark.parametrize("flags, named", [
    (["--seqlen=128"], "--seqlen=128"),
    (["--n_head=3"], "--n_head=3"),
    (["--rows=0"], "--rows=0"),
    (["--steps=0"], "--steps=0"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_value(capsys, flags, named):
  status = peer.main([*_flags(TINY), *flags])
  captured = capsys.readouterr()
  assert status == 2
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and named in lines[0], captured.err


def test_bad_flag_exits_2_from_the_command_line():
  proc = _run_cli(*_flags(TINY), "--seqlen=65")
  assert proc.returncode == 2, proc.stderr
  assert proc.stdout == ""
  assert proc.stderr.strip().splitlines() == [
      "torch_peer: --seqlen=65 is invalid: must be <= --max_seqlen=64"]


def test_help_works():
  proc = _run_cli("--help")
  assert proc.returncode == 0 and "--no_compile" in proc.stdout


@pytest.mark.parametrize("which", ["dropout", "attention_dropout"])
def test_dropout_changes_the_loss_on_the_same_batch_and_seed(which):
  base = dict(TINY, steps=1, warmup=0, compile=False, device="cpu")
  without = peer.measure(**base)["losses"][0]
  again = peer.measure(**base)["losses"][0]
  with_dropout = peer.measure(**base, **{which: 0.3})["losses"][0]
  assert without == again  # Same seed, same batch: only dropout can make the difference.
  assert abs(with_dropout - without) > 1e-4, (with_dropout, without)


def test_a_failure_in_the_run_comes_back_as_an_error_field(monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise RuntimeError("out of memory:\n tried to allocate 1 GiB")
  monkeypatch.setattr(peer, "GPT", out_of_memory)
  result = peer.measure(**TINY, steps=1, compile=False, device="cpu")
  assert result["error"] == "RuntimeError: out of memory: tried to allocate 1 GiB"
  assert peer.main([*_flags(TINY), "--steps=1", "--no_compile", "--device=cpu"]) == 1


def test_unknown_setting_is_refused():
  with pytest.raises(peer.SettingsError, match="n_layers"):
    peer.measure(n_layers=2)
