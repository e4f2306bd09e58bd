"""Bad input to any entry point ends it within seconds, before any long work: exit status 2 and
exactly one line on stderr, `error: ...`, naming the bad value (no traceback).

Each case calls the entry point's `main(argv)` in this process (harness.call), as `python -m`
would run it, with stderr captured at the file-descriptor level: a warning a library prints
there counts as a second line, as a user would see it.
"""

import importlib
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import harness
from conftest import REPO

TINY = "--config=configs/tiny.py"
DATA = "--config.data.source=files:{corpus}/*.txt --config.data.dir={tmp}/prepared"
SECONDS = 30  # Generous for a loaded 2-core machine: every case takes well under 1 s alone.

# (name, entry point, arguments ({...}: the `scratch` fixture's paths), what the error says).
CASES = [
    # Config files and fields.
    ("config_missing", "plan", "--config={tmp}/no_such.py",
     r"--config=\S+/no_such\.py is invalid: no such file \(config files: configs/gpt2_117m\.py"),
    ("config_raises", "plan", "--config={raises}",
     r"--config=\S+/raises\.py could not be loaded: boom in get_config"),
    ("config_without_get_config", "plan", "--config={noget}",
     r"--config=\S+/noget\.py could not be loaded: .*'get_config'"),
    ("config_is_a_directory", "plan", "--config={empty}", r"--config=\S+/empty is invalid"),
    ("config_flag_missing", "plan", "configs/tiny.py", r"--config is required"),
    ("batch_size_zero", "plan", "{tiny} --config.batch_size=0",
     r"config\.batch_size=0 is invalid: must be an integer >= 1"),
    ("batch_size_not_int", "plan", "{tiny} --config.batch_size=1.5",
     r"--config\.batch_size=1\.5: invalid literal for int"),
    ("override_without_value", "plan", "{tiny} --config.batch_size",
     r"Missing value for flag --config\.batch_size"),
    ("lr_negative", "plan", "{tiny} --config.optim.lr=-1",
     r"config\.optim\.lr=-1\.0 is invalid: must be > 0"),
    ("lr_not_a_number", "plan", "{tiny} --config.optim.lr=abc",
     r"--config\.optim\.lr=abc: could not convert string to float"),
    ("pacing_kind", "plan", "{tiny} --config.pacing.kind=bogus",
     r"config\.pacing\.kind='bogus' is invalid: must be one of none, linear, root, discrete, "
     r"adaptive"),
    ("adaptive_unknown_key", "plan", "{tiny} --config.pacing.kind=adaptive "
     "--config.pacing.adaptive.every_step=5", r"every_step"),
    ("adaptive_window_zero", "plan", "{tiny} --config.pacing.kind=adaptive "
     "--config.pacing.adaptive.every_steps=0",
     r"config\.pacing\.adaptive\.every_steps=0 is invalid: must be an integer >= 1"),
    ("adaptive_deadline_before_first_decision", "plan", "{tiny} --config.pacing.kind=adaptive "
     "--config.pacing.adaptive.every_steps=200 --config.pacing.adaptive.deadline_fraction=0.01",
     r"deadline_fraction=0\.01 is invalid: it reaches seqlen_end=256 at step \d+, before the "
     r"first decision applies"),
    ("adaptive_deadline_past_the_run", "plan", "{tiny} --config.pacing.kind=adaptive "
     "--config.pacing.adaptive.deadline_fraction=1.5",
     r"deadline_fraction=1\.5 is invalid: must be a number in \(0, 1\)"),
    ("adaptive_with_batch_warmup", "plan", "{tiny} --config.pacing.kind=adaptive "
     "--config.batch_warmup.start=4 --config.batch_warmup.tokens=1000",
     r"batch_warmup\.start=4 is invalid: batch warmup together with pacing\.kind='adaptive' "
     r"needs batch_warmup\.allow_with_slw=True"),
    ("tune_adaptive", "tune", "{tiny} --config.pacing.kind=adaptive --workdir={tmp}/tune",
     r"pacing\.kind='adaptive' is invalid for tune: .*decides its lengths online"),
    ("seqlen_start_too_long", "plan", "{tiny} --config.pacing.seqlen_start=2000",
     r"config\.pacing\.seqlen_start=2000 is invalid"),
    ("heads_do_not_divide_width", "plan", "{tiny} --config.model.n_head=3",
     r"config\.model\.n_head=3 is invalid: must divide model\.d_model=128"),
    ("dtype", "plan", "{tiny} --config.model.dtype=float8",
     r"config\.model\.dtype='float8' is invalid: must be one of float32, bfloat16"),
    ("remat", "plan", "{tiny} --config.model.remat=sometimes",
     r"config\.model\.remat='sometimes' is invalid: must be one of none, block, dots"),
    ("microbatches", "plan", "{tiny} --config.optim.microbatches=3",
     r"config\.optim\.microbatches=3 is invalid: must divide batch_size=16"),
    ("mesh_two_wildcards", "plan", "{tiny} --config.mesh.data=-1 --config.mesh.tensor=-1",
     r"config\.mesh=.*'tensor': -1.* is invalid: at most one axis may be -1"),
    ("vocab_form", "plan", "{tiny} --config.data.vocab=nonsense",
     r"config\.data\.vocab='nonsense' is invalid: must be byte, spm:PATH or gpt2:PATH"),
    ("source_form", "plan", "{tiny} --config.data.source=files:",
     r"config\.data\.source='files:' is invalid: must be pystdlib, files:GLOB"),
    ("unknown_key", "plan", "{tiny} --config.no_such=1",
     r"--config\.no_such is not a config key: config has no field 'no_such' \(allowed: "),
    ("unknown_nested_key", "plan", "{tiny} --config.optim.no_such=1",
     r"--config\.optim\.no_such is not a config key: config\.optim has no field 'no_such'"),
    ("group_given_a_value", "plan", "{tiny} --config.optim=1",
     r"--config\.optim=1: Failed to parse '1' as a ConfigDict"),
    ("mesh_does_not_match_devices", "main", "{tiny} --workdir={tmp}/run_mesh --config.mesh.data=3",
     r"config\.mesh: data=3 x fsdp=1 x tensor=1 has 3 devices but 8 are available"),
    ("paper_config_without_corpus", "main", "--config=configs/gpt2_117m.py --workdir={tmp}/r117",
     r"config\.data\.source and config\.data\.vocab are unset"),
    # Flags.
    ("unknown_flag", "plan", "{tiny} --bogus_flag", r"Unknown command line flag 'bogus_flag'"),
    ("bool_flag_given_a_word", "plan", "{tiny} --memory true", r"unexpected argument 'true'"),
    ("flagfile_missing", "plan", "{tiny} --flagfile={tmp}/no_flags.txt",
     r"^error: Unable to open flagfile: .*no_flags\.txt"),
    ("every_zero", "plan", "{tiny} --every=0", r"--every=0 is invalid: must be an integer >= 1"),
    ("format", "plan", "{tiny} --format=xml",
     r"--format=xml: value should be one of <text\|csv\|json>"),
    ("memory_without_devices", "plan", "{tiny} --memory",
     r"--devices=None is invalid: --memory needs --devices=N"),
    ("workdir_missing", "main", "{tiny}", r"--workdir is required"),
    ("step_for_main", "main", "{tiny} --workdir={tmp}/run_step --step=3",
     r"--step=3 is for evaluate and convert"),
    ("num_processes", "main", "{tiny} --workdir={tmp}/run_np --num_processes=abc",
     r"--num_processes=abc: invalid literal for int"),
    ("workdir_under_a_file", "main", "{tiny} --workdir={file}/run",
     r"--workdir=\S+/a_file/run is not a writable directory: Not a directory"),
    ("workdir_is_a_file", "main", "{tiny} --workdir={file}",
     r"--workdir=\S+/a_file: is a file, not a directory"),
    ("tune_workdir_is_a_file", "tune", "{tiny} --workdir={file}",
     r"--workdir=\S+/a_file: is a file, not a directory"),
    ("tune_workdir_missing", "tune", "{tiny}", r"--workdir is required"),
    ("step_not_an_int", "evaluate", "--workdir={run} --task=val --step=abc",
     r"--step=abc: invalid literal for int"),
    ("task", "evaluate", "--workdir={run} --task=bogus",
     r"--task=bogus: value should be one of <val\|wikitext103\|lambada>"),
    ("evaluate_without_workdir", "evaluate", "--task=val", r"--workdir and --task are required"),
    ("wikitext_without_data", "evaluate", "--workdir={run} --task=wikitext103",
     r"--task=wikitext103 needs --data=PATH"),
    ("ratio_threshold", "report", "{run} --out={tmp}/report --ratio_threshold=0.5",
     r"--ratio_threshold=0.5 must be > 1"),
    ("report_without_runs", "report", "--out={tmp}/report", r"pass one or more run directories"),
    ("report_of_a_non_run", "report", "{empty} --out={tmp}/report",
     r"'\S+/empty' has no metrics\.jsonl"),
    ("workers_zero", "prepare", "{tiny} --workers=0", r"--workers=0 is invalid"),
    ("convert_direction_missing", "convert", "--workdir={run}", r"pass --from_hf=HF_DIR"),
    # Data paths.
    ("glob_matches_nothing", "prepare",
     "{tiny} --config.data.source=files:{tmp}/nothing/*.txt --config.data.dir={tmp}/d1",
     r"config\.data\.source='files:\S+/nothing/\*\.txt' matches no \.txt or \.jsonl file"),
    ("main_glob_matches_nothing", "main",
     "{tiny} --workdir={tmp}/run_glob --config.data.source=files:{tmp}/nothing/*.txt "
     "--config.data.dir={tmp}/d2",
     r"config\.data\.source='files:\S+/nothing/\*\.txt' matches no \.txt or \.jsonl file"),
    ("megatron_prefix_missing", "main",
     "{tiny} --workdir={tmp}/run_megatron --config.data.source=megatron:{tmp}/no_corpus",
     r"config\.data\.source='megatron:\S+/no_corpus': \S+/no_corpus\.idx does not exist"),
    ("hf_hub_name", "prepare", "{tiny} --config.data.source=hf:openwebtext "
     "--config.data.dir={tmp}/d_hub", r"config\.data\.source='hf:openwebtext': no directory "
     r"'openwebtext'; a Hugging Face hub name is never downloaded here: download it first"),
    ("hf_not_a_saved_dataset", "prepare", "{tiny} --config.data.source=hf:{empty} "
     "--config.data.dir={tmp}/d_hf", r"'\S+/empty' is not a dataset saved with "
     r"datasets\.save_to_disk"),
    ("hf_files_match_nothing", "main", "{tiny} --workdir={tmp}/run_hf "
     "--config.data.source=hf_files:{tmp}/nothing/*.parquet --config.data.dir={tmp}/d_hf2",
     r"config\.data\.source='hf_files:\S+/nothing/\*\.parquet' matches no \.parquet, "
     r"\.arrow, \.jsonl file"),
    ("workdir_url_without_bucket", "main", "{tiny} --workdir=s3://",
     r"--workdir='s3://' names no bucket: write s3://BUCKET/PATH"),
    ("workdir_url_unknown_protocol", "evaluate", "--workdir=nosuch://b/run --task=val",
     r"--workdir='nosuch://b/run' is not a URL fsspec can read"),
    ("prepare_into_object_storage", "prepare", "{tiny} --config.data.dir=s3://bucket/data",
     r"config\.data\.dir='s3://bucket/data': prepare writes a local directory; prepare into "
     r"one, then copy it to the bucket"),
    ("data_cache_dir_in_object_storage", "plan", "{tiny} --config.data.cache_dir=gs://b/cache",
     r"config\.data\.cache_dir='gs://b/cache' is invalid: must be a local directory"),
    ("report_out_without_bucket", "report", "{run} --out=gs:///report",
     r"--out='gs:///report' names no bucket: write gs://BUCKET/PATH"),
    ("wandb_mode", "plan", "{tiny} --config.log.wandb_project=p --config.log.wandb_mode=cloud",
     r"config\.log\.wandb_mode='cloud' is invalid: must be one of online, offline"),
    ("megatron_prepared", "prepare", "{tiny} --config.data.source=megatron:{tmp}/no_corpus",
     r"config\.data\.source='megatron:\S+/no_corpus' is read as is: there is nothing to prepare"),
    ("metadata_damaged", "main",
     "{tiny} --workdir={tmp}/run_meta --config.data.source=files:{corpus}/*.txt "
     "--config.data.dir={bad_data}",
     r"\S+/bad_data/metadata\.json is unreadable \(Expecting property name"),
    ("data_dir_is_a_file", "prepare", "{tiny} --config.data.source=files:{corpus}/*.txt "
     "--config.data.dir={file}", r"config\.data\.dir='\S+/a_file' is a file"),
    ("data_dir_holds_other_files", "prepare", "{tiny} --config.data.source=files:{corpus}/*.txt "
     "--config.data.dir={user_dir}",
     r"config\.data\.dir='\S+/user_dir' holds files but no prepared data"),
    ("data_json_missing", "prepare", "--data_json={tmp}/no_data.json",
     r"No such file or directory: '\S+/no_data\.json'"),
    # Checkpoints.
    ("evaluate_no_checkpoints", "evaluate", "--workdir={empty} --task=val",
     r"--workdir=\S+/empty has no checkpoints/"),
    ("evaluate_step_not_saved", "evaluate", "--workdir={run} --task=val --step=7",
     r"--step=7 is not a checkpoint in \S+/run/checkpoints \(saved: \[4\]\)"),
    ("export_no_checkpoints", "convert", "--to_hf={tmp}/hf_out --workdir={empty}",
     r"--workdir=\S+/empty has no checkpoints/"),
    ("export_step_not_saved", "convert", "--to_hf={tmp}/hf_out --workdir={run} --step=7",
     r"--step=7 is not a checkpoint in \S+/run/checkpoints \(saved: \[4\]\)"),
    ("import_without_config_json", "convert", "--from_hf={empty} --workdir={tmp}/imported {tiny}",
     r"--from_hf=\S+/empty has no config\.json"),
    ("import_damaged_config_json", "convert",
     "--from_hf={bad_hf} --workdir={tmp}/imported {tiny}",
     r"\S+/bad_hf/config\.json is not readable JSON"),
    # Tokenizer files.
    ("spm_missing", "prepare", "{tiny} " + DATA + " --config.data.vocab=spm:{tmp}/no.model",
     r"config\.data\.vocab='spm:\S+/no\.model' is invalid: does not exist"),
    ("spm_not_a_model", "prepare", "{tiny} " + DATA + " --config.data.vocab=spm:{file}",
     r"config\.data\.vocab='spm:\S+/a_file' is invalid: .*not a SentencePiece model"),
    ("gpt2_dir_missing", "prepare", "{tiny} " + DATA + " --config.data.vocab=gpt2:{tmp}/no_gpt2",
     r"config\.data\.vocab='gpt2:\S+/no_gpt2' is invalid: does not exist"),
    ("gpt2_vocab_garbage", "prepare", "{tiny} " + DATA + " --config.data.vocab=gpt2:{bad_gpt2}",
     r"config\.data\.vocab='gpt2:\S+/bad_gpt2' is invalid: is not a readable GPT-2 tokenizer"),
    ("main_gpt2_vocab_garbage", "main",
     "{tiny} --workdir={tmp}/run_vocab " + DATA + " --config.data.vocab=gpt2:{bad_gpt2}",
     r"config\.data\.vocab='gpt2:\S+/bad_gpt2' is invalid: is not a readable GPT-2 tokenizer"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, corpus_dir):
  """The bad files and directories the cases name, made once."""
  from slw_jax import checkpoint  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("bad_inputs")
  (root / "raises.py").write_text("def get_config():\n  raise RuntimeError('boom in get_config')\n")
  (root / "noget.py").write_text("FIELDS = 1\n")
  (root / "a_file").write_text("not a directory, a model or a run\n")
  for name in ("empty", "bad_data", "user_dir", "bad_gpt2", "bad_hf"):
    (root / name).mkdir()
  (root / "bad_data" / "metadata.json").write_text("{not json")
  (root / "user_dir" / "precious.txt").write_text("the user's own file\n")
  (root / "bad_gpt2" / "vocab.json").write_text("garbage{")
  (root / "bad_gpt2" / "merges.txt").write_text("#version: 0.2\n")
  (root / "bad_hf" / "config.json").write_text("{oops")
  saved = checkpoint.Checkpoints(str(root / "run" / "checkpoints"), keep=2, async_save=False)
  saved.save(4, {"params": {"w": np.zeros(2, np.float32)}}, {"step": 4})  # Only step 4 exists.
  saved.close()
  (root / "run" / "metrics.jsonl").write_text("")
  paths = {name: str(root / name) for name in ("empty", "run", "bad_data", "user_dir",
                                                  "bad_gpt2", "bad_hf")}
  return dict(paths, tmp=str(root), corpus=str(corpus_dir), tiny=TINY, file=str(root / "a_file"),
              raises=str(root / "raises.py"), noget=str(root / "noget.py"))


def _call(entry: str, args: str, scratch: dict) -> harness.Exit:
  module = importlib.import_module(f"slw_jax.{entry}")
  return harness.call(module.main, [f"slw_jax.{entry}", *shlex.split(args.format(**scratch))])


def test_cases_are_many_and_distinct():
  assert len(CASES) >= 30 and len({name for name, *_ in CASES}) == len(CASES)
  assert len({(entry, args) for _, entry, args, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("entry,args,message", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_error(entry, args, message, scratch, capfd, monkeypatch):
  monkeypatch.chdir(REPO)  # Relative config paths, as a user types them.
  capfd.readouterr()
  result = _call(entry, args, scratch)
  out, err = capfd.readouterr()
  assert result.code == 2, f"exit status {result.code}; stderr: {err[-2000:]}; stdout: {out[-500:]}"
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err[-2000:]
  assert re.search(message, err), err
  assert result.seconds < SECONDS


def test_prepare_never_replaces_a_directory_of_other_files(scratch, capfd, monkeypatch):
  """The refusal above protects the user's files: preparing once replaced data.dir whole."""
  monkeypatch.chdir(REPO)
  args = "{tiny} --config.data.source=files:{corpus}/*.txt --config.data.dir={user_dir} --force"
  assert _call("prepare", args, scratch).code == 2
  assert "holds files but no prepared data" in capfd.readouterr().err
  assert (pathlib.Path(scratch["user_dir"]) / "precious.txt").read_text() == "the user's own file\n"


def _internal_error(kind):
  def broken(*args, **kwargs):
    raise kind("an internal bug, not bad input")
  return broken


# (entry point, arguments, the function that fails, the error it raises): bugs inside setup.
BUGS = [
    ("main", "{tiny} --workdir={tmp}/bug_mesh", "slw_jax.train_step.on_mesh", ValueError),
    ("main", "{tiny} --workdir={tmp}/bug_memory " + DATA,
     "slw_jax.compiled_steps.choose_microbatches", TypeError),
    ("plan", "{tiny}", "slw_jax.optim.learning_rates", TypeError),
    ("evaluate", "--workdir={run} --task=val", "slw_jax.checkpoint.load_params", ValueError),
]


@pytest.mark.parametrize("entry,args,target,kind", BUGS,
                         ids=[f"{entry}-{kind.__name__}" for entry, _, _, kind in BUGS])
def test_an_internal_error_keeps_its_traceback(entry, args, target, kind, scratch, monkeypatch):
  """A ValueError or TypeError from our code or from JAX is a bug: it is not turned into an
  `error:` line and status 2 (as bad input is), it propagates (a traceback, status 1)."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(target, _internal_error(kind))
  with pytest.raises(kind, match="an internal bug"):
    _call(entry, args, scratch)


def test_an_internal_error_prints_a_traceback_and_exits_1(scratch):
  """The same, as a user sees it: `python -m slw_jax.plan` with a bug in its setup."""
  code = ("import sys; from slw_jax import optim, plan\n"
          "def broken(*a, **k): raise ValueError('an internal bug, not bad input')\n"
          "optim.learning_rates = broken\n"
          f"plan.main(['slw_jax.plan', {TINY!r}])")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.strip().splitlines()[-1] == "ValueError: an internal bug, not bad input"
