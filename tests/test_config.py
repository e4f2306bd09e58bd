"""Configs: every file loads, validates and builds; every validation error names its field."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIG_FILES, REPO
from slw_jax import config_diff, config_lib, models


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_loads_validates_and_builds(path):
  config = config_lib.load_config_file(str(path))
  frozen = config_lib.validate(config)
  assert frozen.pacing.seqlen_end == frozen.model.max_seqlen
  assert (frozen.optim.decay_tokens is None) != (frozen.optim.decay_steps is None)
  cfg = models.GPTConfig.from_config(frozen.model)
  abstract = nnx.eval_shape(lambda: models.GPT(cfg, nnx.Rngs(0)))  # Builds, allocates nothing.
  assert abstract.wte_vd.shape == (cfg.padded_vocab, cfg.d_model)


BAD = [
    (dict(pacing__seqlen_start=300), "config.pacing.seqlen_start=300"),
    (dict(pacing__seqlen_end=512), "config.pacing.seqlen_end=512"),
    (dict(pacing__seqlen_end=252), "multiple of pacing.multiple=32"),
    (dict(pacing__multiple=48), "config.pacing.seqlen_end=256"),
    (dict(pacing__duration_steps=0), "config.pacing.duration_steps=0"),
    (dict(pacing__kind="cubic"), "config.pacing.kind='cubic'"),
    (dict(pacing__kind="root", pacing__root_degree=0.0), "config.pacing.root_degree=0.0"),
    (dict(pacing__kind="discrete", pacing__stages=()), "non-empty"),
    (dict(pacing__kind="discrete", pacing__stages=((64, 50), (128, 20))), "strictly increasing"),
    (dict(pacing__kind="discrete", pacing__stages=((60, 50),)), "stage seqlen 60"),
    (dict(pacing__kind="discrete", pacing__stages=((64,),)), "(seqlen, last_step) pair"),
    (dict(optim__min_lr=1.0), "config.optim.min_lr=1.0"),
    (dict(optim__lr=0.0), "config.optim.lr=0.0"),
    (dict(optim__decay_tokens=1000), "config.optim.decay_tokens=1000"),
    (dict(optim__warmup_steps=0, optim__warmup_tokens=5000, optim__decay_tokens=4000),
     "config.optim.decay_tokens=4000"),
    (dict(optim__warmup_tokens=100), "config.optim.warmup_tokens=100"),
    (dict(optim__decay_steps=100, optim__decay_tokens=100_000), "config.optim.decay_steps=100"),
    (dict(optim__b2=1.0), "config.optim.b2=1.0"),
    (dict(optim__clip_norm=-1.0), "config.optim.clip_norm=-1.0"),
    (dict(train_tokens=None), "set train_tokens or train_steps"),
    (dict(train_tokens=-5), "config.train_tokens=-5"),
    (dict(batch_size=0), "config.batch_size=0"),
    (dict(model__n_head=3), "config.model.n_head=3"),
    (dict(model__dtype="float16"), "config.model.dtype='float16'"),
    (dict(model__dropout=1.0), "config.model.dropout=1.0"),
    (dict(model__n_layer=0), "config.model.n_layer=0"),
    (dict(model__attention="flash"), "config.model.attention='flash'"),
    (dict(model__attention_block=0), "config.model.attention_block=0"),
    (dict(model__remat="full"), "config.model.remat='full'"),
    (dict(model__loss_head="chunked"), "config.model.loss_head='chunked' is invalid: must be "
     "one of fused, full"),
    (dict(model__loss_chunk_tokens=-1), "config.model.loss_chunk_tokens=-1 is invalid"),
    (dict(model__dropout=0.1, model__max_seqlen=2**20, model__d_model=4096, model__n_head=32),
     "config.model.dropout_rng='hash' is invalid: hash numbers (position, feature) pairs"),
    (dict(model__attention_dropout=0.1, model__max_seqlen=2**16),
     "config.model.attention_dropout=0.1 is invalid: its hashed masks number"),
    (dict(model__dropout_rng="rbg"), "config.model.dropout_rng='rbg' is invalid: must be one "
     "of hash, threefry"),
    # ml_collections refuses a str or int for a bool field as it is set; None gets through.
    (dict(model__qk_norm=None), "config.model.qk_norm=None is invalid: must be true or false"),
    (dict(model__attention="cudnn"), "cuDNN fused attention needs model.dtype=bfloat16"),
    (dict(optim__z_loss=-0.1), "config.optim.z_loss=-0.1 is invalid: must be a number >= 0"),
    (dict(optim__z_loss=float("nan")), "config.optim.z_loss=nan is invalid"),
    (dict(optim__z_loss=None), "config.optim.z_loss=None is invalid"),
    (dict(optim__microbatches=0), "config.optim.microbatches=0"),
    (dict(optim__microbatches="max"), "must be an integer >= 1 or 'auto'"),
    (dict(optim__microbatches=3), "must divide batch_size=16"),
    (dict(compile__pad_multiple=12), "config.compile.pad_multiple=12"),
    (dict(compile__pad_multiple=0), "must be a positive multiple of pacing.multiple=32"),
    (dict(compile__pad_multiple=512), "up to the context pacing.seqlen_end=256"),
    (dict(compile__threads=0), "config.compile.threads=0"),
    (dict(data__source="tfds:lm1b"), "config.data.source='tfds:lm1b'"),
    (dict(data__source="web:x"), "config.data.source='web:x'"),
    (dict(data__vocab="gpt2"), "config.data.vocab='gpt2'"),
    (dict(data__mode="pack"), "config.data.mode='pack'"),
    (dict(data__val_fraction=0.0), "config.data.val_fraction=0.0"),
    (dict(data__prefetch=-1), "config.data.prefetch=-1"),
    (dict(model__vocab_size=100), "config.model.vocab_size=100"),
    (dict(batch_warmup__start=4, batch_warmup__tokens=1000), "allow_with_slw=True"),
    (dict(batch_warmup__start=4, pacing__kind="none"), "config.batch_warmup.tokens=0"),
    (dict(batch_warmup__start=32, batch_warmup__tokens=10, pacing__kind="none"),
     "config.batch_warmup.start=32"),
    (dict(batch_warmup__start=4, batch_warmup__tokens=10, batch_warmup__multiple=5,
          pacing__kind="none"), "config.batch_size=16"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_validation_errors_name_field_value_and_allowed(load_config, overrides, message):
  with pytest.raises(ValueError) as info:
    config_lib.validate(load_config("tiny", **overrides))
  text = str(info.value)
  assert message in text and "\n" not in text
  assert "invalid" in text or "set " in text


def test_batch_warmup_with_slw_when_allowed(load_config):
  c = config_lib.validate(load_config("tiny", batch_warmup__start=4, batch_warmup__tokens=1000,
                                      batch_warmup__allow_with_slw=True))
  assert c.batch_warmup.start == 4


def test_unknown_key_is_rejected_by_locked_config(load_config):
  with pytest.raises(AttributeError, match="bogus"):
    load_config("tiny", pacing__bogus=3)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "slw_jax.plan", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/tiny.py", "--config.pacing.bogus=1"],
     "--config.pacing.bogus is not a config key"),
    (["--config=configs/tiny.py", "--config.pacing.seqlen_start=999"],
     "config.pacing.seqlen_start=999 is invalid"),
    (["--config=configs/tiny.py", "--config.optim.lr=fast"], "--config.optim.lr=fast"),
    (["--config=configs/missing.py"], "no such file"),
    ([], "--config is required"),
])
@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
  result = _cli(*args)
  assert result.returncode == 2
  assert result.stdout == ""
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_microbatches_takes_an_integer_or_auto_from_the_command_line(tmp_path):
  """optim.microbatches holds either type: the flag parser must not force one on it."""
  for value, expected in (("auto", "'auto'"), ("4", "4")):
    result = subprocess.run(
        [sys.executable, "-c", "from slw_jax import cli; import sys; "
         "print(repr(cli.parse_config(sys.argv).optim.microbatches))",
         "--config=configs/tiny.py", f"--config.optim.microbatches={value}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == expected


def test_old_checkpoint_configs_gain_new_defaults_on_one_device(load_config):
  """A config saved before remat/microbatches existed still evaluates; a GPU-only kernel falls
  back to what this machine runs."""
  saved = config_lib.validate(load_config("tiny")).to_dict()
  del saved["model"]["remat"], saved["optim"]["microbatches"], saved["mesh"]["allow_replicated"]
  saved["model"]["attention"] = "cudnn"
  c = config_diff.on_one_device(saved)
  assert c.model.remat == "none" and c.optim.microbatches == 1 and c.model.attention == "auto"
  assert models.GPTConfig.from_config(saved["model"]).remat == "none"


@pytest.mark.slow
def test_a_saved_config_without_qk_norm_builds_the_model_it_always_built(load_config):
  """model.qk_norm is param-shaping, yet a checkpoint's config from before it existed still
  builds (with or without saved_defaults) the same model: no q/k norm, the same parameters."""
  current = config_lib.validate(load_config("tiny"))
  saved = current.to_dict()
  del saved["model"]["qk_norm"]
  assert config_diff.on_one_device(saved).model.qk_norm is False
  old = models.GPTConfig.from_config(saved["model"])  # No KeyError: it takes the default.
  assert old == models.GPTConfig.from_config(current.model) and not old.qk_norm
  build = lambda cfg: nnx.to_pure_dict(nnx.state(  # noqa: E731
      nnx.jit(lambda: models.GPT(cfg, nnx.Rngs(0)))(), nnx.Param))
  then, now = build(old), build(models.GPTConfig.from_config(current.model))
  assert jax.tree.structure(then) == jax.tree.structure(now)
  for a, b in zip(jax.tree.leaves(then), jax.tree.leaves(now)):
    np.testing.assert_array_equal(a, b)
  assert set(then["blocks"][0]["attn"]) == {"qkv_weight_dchk", "qkv_bias_chk", "out_weight_hkd",
                                            "out_bias_d"}


def test_scan_layers_defaults_on_from_12_blocks_and_off_for_old_checkpoints(load_config):
  assert not config_lib.validate(load_config("tiny")).model.scan_layers
  for name in ("gpt2_117m", "gpt2_1p5b", "gpt3_125m"):
    assert config_lib.validate(load_config(name)).model.scan_layers, name
  assert not config_lib.validate(load_config("gpt2_117m", model__scan_layers=False)).model.scan_layers
  saved = config_lib.validate(load_config("gpt2_117m")).to_dict()
  del saved["model"]["scan_layers"]  # Saved by a release that always unrolled its blocks.
  assert not config_diff.on_one_device(saved).model.scan_layers
  assert not models.GPTConfig.from_config(saved["model"]).scan_layers


# The recipes the paper configs follow, written out from their sources (configs/*.py cite them
# line by line): the paper (Sec. 3, 5.2), GPT-3 (Table 2.1, Appendix B), Megatron-LM's defaults.
GPT2_RECIPE = {"batch_size": 512, "train_tokens": 157_286_400_000, "model.max_seqlen": 1024,
               "model.dropout": 0.1, "model.attention_dropout": 0.1, "optim.lr": 1.5e-4,
               "optim.min_lr": 1e-5, "optim.warmup_steps": 3000, "optim.b1": 0.9,
               "optim.b2": 0.999, "optim.eps": 1e-8, "optim.weight_decay": 0.01,
               "optim.clip_norm": 1.0}
RECIPES = {
    "gpt2_117m": {**GPT2_RECIPE, "model.n_layer": 12, "model.d_model": 768,
                  "pacing.seqlen_start": 8, "pacing.duration_steps": 60_000},
    "gpt2_1p5b": {**GPT2_RECIPE, "model.n_layer": 48, "model.d_model": 1600,
                  "model.remat": "block", "pacing.seqlen_start": 64,
                  "pacing.duration_steps": 270_000},
    "gpt3_125m": {"batch_size": 2048, "train_tokens": 30_000_000_000, "model.n_layer": 12,
                  "model.d_model": 768, "model.max_seqlen": 2048, "model.dropout": 0.1,
                  "model.attention_dropout": 0.1, "optim.lr": 2.4e-2, "optim.min_lr": 0.0,
                  "optim.warmup_tokens": 375_000_000, "optim.warmup_steps": 0,
                  "optim.b1": 0.9, "optim.b2": 0.95, "optim.eps": 1e-8,
                  "optim.weight_decay": 0.1, "optim.clip_norm": 1.0, "pacing.seqlen_start": 72,
                  "pacing.duration_steps": 11_500, "batch_warmup.start": 0},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_configs_follow_their_recipes_and_cite_every_value(name):
  c = config_lib.load_config_file(f"configs/{name}.py")
  for key, expected in RECIPES[name].items():
    group, _, field = key.rpartition(".")
    value = c[group][field] if group else c[field]
    assert value == expected, f"{name}: {key}={value!r}, the recipe says {expected!r}"
  # Every optimizer, pacing and dropout line names its source.
  with open(f"configs/{name}.py") as f:
    lines = [l for l in f if re.match(r"\s*c\.(optim\.(?!microbatches)|pacing\.|model\.\w*dropout"
                                      r"|batch_size|train_tokens)", l)]
  uncited = [l.strip() for l in lines if not re.search(r"\[(paper|gpt3|script|megatron)\]", l)]
  assert lines and not uncited, uncited  # gpt2_1p5b cites what it changes of gpt2_117m.


def test_a_saved_config_from_before_rounding_down_still_loads():
  """Checkpoints of runs whose seqlen_start was below pacing.multiple (then rounded up to it)
  are still evaluated and converted: the saved start is read as the multiple."""
  saved = config_lib.base_config().to_dict()
  saved["pacing"].update(seqlen_start=16, multiple=32, seqlen_end=256)
  saved["model"].update(max_seqlen=256, vocab_size=259)
  saved["data"].update(source="pystdlib", vocab="byte")
  saved["train_tokens"] = 1_000_000
  c = config_diff.on_one_device(saved)
  assert c.pacing.seqlen_start == 32


def test_an_old_checkpoints_config_shows_the_changed_defaults_as_logged_changes(load_config):
  """A config saved before model.dropout_rng and compile.xla_remat existed ran threefry masks
  and XLA's remat pass: a resume logs both changes (allowed) instead of hiding them."""
  from slw_jax import resume  # pylint: disable=g-import-not-at-top
  current = config_lib.validate(load_config("gpt2_117m")).to_dict()
  saved = {**current, "model": dict(current["model"]), "compile": dict(current["compile"])}
  del saved["model"]["dropout_rng"], saved["compile"]["xla_remat"]
  allowed, schedule = resume.check_config(
      config_diff.saved_defaults(saved), current, models.GPTConfig.param_shaping_fields(),
      "--workdir=old", allow_schedule_change=False)
  assert "model.dropout_rng='threefry' there, 'hash' here" in allowed
  assert "compile.xla_remat=True there, False here" in allowed and schedule == []
