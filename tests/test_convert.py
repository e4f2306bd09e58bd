"""GPT-2 interop against `transformers`' own GPT-2 (random weights made here; nothing is
downloaded): imported logits equal the original's, export loads back into transformers, training
continues from imported weights, and bad checkpoints are refused with one line."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # Belt and braces: nothing here may reach a hub.

import torch  # noqa: E402  (test-only dependencies, pinned in requirements.txt)
import transformers  # noqa: E402

from conftest import REPO, metric_rows  # noqa: E402
from slw_jax import checkpoint, config_lib, convert, errors, evaluate, trainer  # noqa: E402

SHAPE = {"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4}


def hf_gpt2(seed=0, eos=1, **shape):
  """A random transformers GPT-2. Every tensor is perturbed (transformers initializes
  LayerNorms to 1 and biases to 0), so each one's placement shows in the logits."""
  torch.manual_seed(seed)
  config = transformers.GPT2Config(**{**SHAPE, **shape}, bos_token_id=eos, eos_token_id=eos)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


def save_old_style(model, directory):
  """pytorch_model.bin as older GPT-2 releases ship it: names without the `transformer.`
  prefix, causal-mask buffers beside the weights, the tied head stored too."""
  os.makedirs(directory, exist_ok=True)
  model.config.to_json_file(os.path.join(directory, "config.json"))
  state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
  n = model.config.n_positions
  for i in range(model.config.n_layer):
    state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n))
    state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  state["lm_head.weight"] = state["wte.weight"]
  torch.save(state, os.path.join(directory, "pytorch_model.bin"))


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(workdir, tokens):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  loaded = checkpoint.load_params(str(workdir))
  return np.asarray(nnx.merge(loaded.graphdef, loaded.params)(np.asarray(tokens, np.int32)))


def relative_error(ours, reference):
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def import_config(load_config, hf_dir, **overrides):
  c = load_config("tiny", **overrides)
  convert.take_model_shape(c, convert.read_hf_config(str(hf_dir)), log=lambda _: None)
  return config_lib.validate(c)


TOKENS = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (3, 32))


def save_sharded_half(model, directory):
  """float16 weights in two safetensors shards with an index, as large checkpoints ship."""
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  model.config.to_json_file(os.path.join(directory, "config.json"))
  state = {k: v.half().contiguous() for k, v in model.state_dict().items()
           if k != "lm_head.weight"}
  names = sorted(state)
  shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for shard, keys in shards.items():
    safetensors_torch.save_file({k: state[k] for k in keys}, os.path.join(directory, shard),
                                metadata={"format": "pt"})
  weight_map = {k: shard for shard, keys in shards.items() for k in keys}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with torch.no_grad():  # The reference: the same float16 values, computed in float32.
    for name, param in model.named_parameters():
      param.copy_(param.half().float())


@pytest.mark.parametrize("layout,overrides,source", [
    ("safetensors", {"model__vocab_pad_multiple": 128}, "model.safetensors"),  # 300 -> 384 rows.
    ("old_pytorch_bin", {"model__attention": "dot_product"}, "pytorch_model.bin"),
    ("sharded_float16", {"model__scan_layers": True}, "model.safetensors.index.json"),
])
@pytest.mark.slow
def test_imported_logits_equal_transformers(tmp_path, load_config, layout, overrides, source):
  model = hf_gpt2()
  hf_dir = tmp_path / "hf"
  {"safetensors": model.save_pretrained, "old_pytorch_bin": lambda d: save_old_style(model, d),
   "sharded_float16": lambda d: save_sharded_half(model, d)}[layout](hf_dir)
  c = import_config(load_config, hf_dir, **overrides)
  meta = convert.import_hf(str(hf_dir), str(tmp_path / "run"), c, log=lambda _: None)
  assert meta["step"] == 0 and meta["imported_from"] == str(hf_dir / source)
  for tokens in (TOKENS, TOKENS[:1, :13]):  # Full context and a shorter one.
    assert relative_error(our_logits(tmp_path / "run", tokens), hf_logits(model, tokens)) < 1e-4


@pytest.mark.slow
def test_export_loads_back_into_transformers(tmp_path, load_config):
  import tokenizers  # pylint: disable=g-import-not-at-top
  model = hf_gpt2(seed=1, eos=7)
  hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
  model.save_pretrained(hf_dir)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(["the cat sat on the mat"] * 20, vocab_size=300, min_frequency=1)
  bpe.save_model(str(hf_dir))  # vocab.json + merges.txt beside the weights, as GPT-2 ships.
  c = import_config(load_config, hf_dir, model__vocab_pad_multiple=64, model__scan_layers=True)
  meta = convert.import_hf(str(hf_dir), str(run), c, log=lambda _: None)
  assert meta["vocab"] == "gpt2:tokenizer"  # Relative to the run directory, which may move.
  moved = tmp_path / "moved"
  shutil.move(run, moved)

  convert.export_hf(str(moved), None, str(out), log=lambda _: None)
  back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  original = model.state_dict()
  for name, value in back.state_dict().items():
    torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)
  np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(model, TOKENS))
  for field in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "bos_token_id",
                "eos_token_id", "activation_function", "layer_norm_epsilon"):
    assert getattr(back.config, field) == getattr(model.config, field), field
  assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors",
                                     "vocab.json"]
  with pytest.raises(convert.ConvertError, match="already has config.json"):
    convert.export_hf(str(moved), None, str(out), log=lambda _: None)
  with pytest.raises(convert.ConvertError, match="is a file, not a directory"):
    convert.export_hf(str(moved), None, str(out / "vocab.json"), log=lambda _: None)

  # The model reads its own tokenizer: evaluation needs no --vocab, and refuses the byte data.
  assert checkpoint.load_params(str(moved)).vocab == f"gpt2:{moved / 'tokenizer'}"
  lambada = tmp_path / "lambada.jsonl"
  lambada.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
  assert evaluate.run(str(moved), "lambada", str(lambada), None, None, 2, 8)["examples"] == 1
  with pytest.raises(ValueError, match="--task=val scores data prepared with "
                     "data.vocab='byte', but this model reads gpt2:"):
    evaluate.run(str(moved), "val", None, None, None, 2, 8)


@pytest.mark.slow
def test_gpt2_tokenizer_model_is_not_trained_on_other_ids(tmp_path, make_config):
  c = make_config()
  hf_dir = tmp_path / "hf"
  hf_gpt2(vocab_size=c.model.vocab_size, n_positions=32, n_layer=1, n_head=2).save_pretrained(
      hf_dir)
  (hf_dir / "tokenizer.json").write_text("{}")  # Any GPT-2 tokenizer: training is refused.
  convert.import_hf(str(hf_dir), str(tmp_path / "run"), c, log=lambda _: None)
  run = trainer.Trainer(c, str(tmp_path / "run"))
  with pytest.raises(errors.StopTraining, match="imported with the tokenizer gpt2:.* but "
                     "config.data.vocab='byte': training would feed it other token ids"):
    run.restore_or_init()


@pytest.mark.slow
def test_training_continues_from_imported_weights(tmp_path, make_config):
  c = make_config(train_steps=3, optim__warmup_steps=1)
  m = c.model
  model = hf_gpt2(vocab_size=m.vocab_size, n_positions=m.max_seqlen, n_embd=m.d_model,
                  n_layer=m.n_layer, n_head=m.n_head)
  model.save_pretrained(tmp_path / "hf")
  workdir = str(tmp_path / "run")
  convert.import_hf(str(tmp_path / "hf"), workdir, c, log=lambda _: None)
  run = trainer.Trainer(c, workdir)
  run.setup()
  assert run.step == 0 and run.carried_meta["imported_from"].endswith("model.safetensors")
  first = run.loader.batch_at(0, *run.schedule.shape(0))
  summary = run.run()
  assert summary["completed"]
  # The first step's loss is the GPT-2's own loss on that batch: training started from it.
  with torch.no_grad():
    logits = model(torch.as_tensor(first.inputs)).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 torch.as_tensor(first.targets).flatten().long())
  assert metric_rows(workdir)[0]["loss"] == pytest.approx(float(expected), rel=1e-4)
  newest = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), 3, async_save=False)
  assert newest.read_meta(newest.latest_step())["imported_from"].endswith("model.safetensors")
  assert newest.read_meta(newest.latest_step())["special_tokens"] == {"bos_token_id": 1,
                                                                      "eos_token_id": 1}
  newest.close()
  # Trained on byte ids, its checkpoints read the run's data.vocab; the import itself, unknown.
  assert checkpoint.load_params(workdir).vocab == "byte"
  with pytest.raises(ValueError, match="--vocab is required: .* holds a model imported from "
                     ".*model.safetensors without tokenizer files"):
    evaluate.run(workdir, "lambada", str(REPO / "README.md"), None, 0, 2, 8)


def _broken(tmp_path, edit_config=None, edit_weights=None):
  hf_dir = tmp_path / "hf"
  hf_gpt2().save_pretrained(hf_dir)
  if edit_config:
    config = json.loads((hf_dir / "config.json").read_text())
    edit_config(config)
    (hf_dir / "config.json").write_text(json.dumps(config))
  if edit_weights:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    weights = safetensors_numpy.load_file(hf_dir / "model.safetensors")
    edit_weights(weights)
    safetensors_numpy.save_file(weights, hf_dir / "model.safetensors", {"format": "pt"})
  return hf_dir


def _untie(weights):
  weights["lm_head.weight"] = weights["transformer.wte.weight"] + 1


@pytest.mark.parametrize("edit_config,edit_weights,message", [
    (lambda c: c.update(activation_function="gelu"), None,
     "activation_function='gelu' is not supported: slw_jax's GPT-2 needs one of gelu_new"),
    (lambda c: c.update(model_type="llama"), None, "model_type='llama' is not supported"),
    (lambda c: c.update(n_inner=100), None, "n_inner=100 is not supported"),
    (None, _untie, "lm_head.weight differs from wte.weight"),
    (None, lambda w: w.pop("transformer.h.1.mlp.c_fc.bias"), "has no tensor 'h.1.mlp.c_fc.bias'"),
    (None, lambda w: w.update(extra=np.zeros(3, np.float32)), "has tensor 'extra'"),
    (lambda c: c.update(n_layer=1), None, "has tensor 'h.1.attn.c_attn.bias'"),
    (lambda c: c.update(n_embd=64), None, "'wte.weight' has shape (300, 32), config.json "
     "implies (300, 64)"),
    (lambda c: c.update(n_layer="2"), None, "n_layer='2' is not supported: slw_jax's GPT-2 "
     "needs an integer >= 1"),
    (lambda c: c.update(layer_norm_epsilon=None), None, "layer_norm_epsilon=None is not "
     "supported"),
    (lambda c: c.update(n_head=5), None, "n_head=5 is not supported: slw_jax's GPT-2 needs a "
     "divisor of n_embd=32"),
])
def test_bad_checkpoints_are_refused(tmp_path, load_config, edit_config, edit_weights, message):
  hf_dir = _broken(tmp_path, edit_config, edit_weights)
  with pytest.raises(convert.ConvertError, match=re.escape(message)):
    c = import_config(load_config, hf_dir)
    convert.import_hf(str(hf_dir), str(tmp_path / "run"), c, log=lambda _: None)
  assert not (tmp_path / "run").exists()  # Refused before anything was written.


def test_import_never_overwrites_a_run(tmp_path, load_config):
  hf_dir, run = tmp_path / "hf", tmp_path / "run"
  hf_gpt2().save_pretrained(hf_dir)
  c = import_config(load_config, hf_dir)
  convert.import_hf(str(hf_dir), str(run), c, log=lambda _: None)
  before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
  hf_gpt2(seed=5).save_pretrained(hf_dir)
  with pytest.raises(convert.ConvertError, match="already holds checkpoints"):
    convert.import_hf(str(hf_dir), str(run), c, log=lambda _: None)
  assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.parametrize("damage,message", [
    (lambda d: os.remove(d / "model.safetensors"), "has no model.safetensors, "
     "model.safetensors.index.json or pytorch_model.bin"),
    (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"),
     "could not be read: SafetensorError"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json holds a list, not a "
     "JSON object"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, load_config, damage, message):
  hf_dir = tmp_path / "hf"
  hf_gpt2().save_pretrained(hf_dir)
  c = import_config(load_config, hf_dir)
  damage(hf_dir)
  with pytest.raises(convert.ConvertError, match=re.escape(message)):
    convert.import_hf(str(hf_dir), str(tmp_path / "run"), c, log=lambda _: None)


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "slw_jax.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line(tmp_path):
  hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
  hf_gpt2().save_pretrained(hf_dir)
  imported = _convert(f"--from_hf={hf_dir}", f"--workdir={run}", "--config=configs/tiny.py")
  assert imported.returncode == 0, imported.stderr
  assert "model.n_layer: 4 -> 2 (from config.json)" in imported.stdout
  assert "imported 36,096 parameters" in imported.stdout
  assert (f"train on: python -m slw_jax.main --config=configs/tiny.py --workdir={run} "
          "--config.model.vocab_size=300 --config.model.n_layer=2 --config.model.d_model=32 "
          "--config.model.max_seqlen=32") in imported.stdout
  exported = _convert(f"--to_hf={out}", f"--workdir={run}", "--step=0")
  assert exported.returncode == 0, exported.stderr
  assert (out / "model.safetensors").is_file()
  trained_on = subprocess.run([sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py",
                               f"--workdir={run}", "--step=0"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
  assert (trained_on.returncode, trained_on.stderr.strip()) == (2, "error: --step=0 is for "
                                                                "evaluate and convert: main "
                                                                "always resumes from the newest "
                                                                "checkpoint of --workdir")
  for args, error in [
      ((f"--workdir={run}",), "error: pass --from_hf=HF_DIR --workdir=OUT --config=CONFIG "
       "(import) or --to_hf=HF_DIR --workdir=RUN (export)"),
      ((f"--from_hf={hf_dir}", f"--workdir={tmp_path / 'new'}"), "error: --from_hf needs "
       "--config=CONFIG: the recipe the imported model trains under (its shape comes from "
       "config.json)"),
      ((f"--from_hf={tmp_path}", f"--workdir={tmp_path / 'new'}", "--config=configs/tiny.py"),
       f"error: --from_hf={tmp_path} has no config.json (expected a Hugging Face GPT-2 "
       "directory: config.json + model.safetensors or pytorch_model.bin)"),
  ]:
    result = _convert(*args)
    assert (result.returncode, result.stderr.strip()) == (2, error)


@pytest.mark.slow
def test_an_imported_gpt2_trains_on_data_in_its_own_tokenizer(tmp_path, make_config,
                                                               corpus_dir):
  """Import a GPT-2 with its tokenizer files, prepare data with them (the data.vocab convert
  prints: gpt2:RUN/tokenizer) and train on: the paper's setting after an import."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))[:10]]
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1,
                          special_tokens=["<|endoftext|>"])
  eos, m = bpe.token_to_id("<|endoftext|>"), make_config().model
  hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
  hf_gpt2(vocab_size=bpe.get_vocab_size(), n_positions=m.max_seqlen, n_embd=m.d_model,
          n_layer=m.n_layer, n_head=m.n_head, eos=eos).save_pretrained(hf_dir)
  bpe.save(str(hf_dir / "tokenizer.json"))
  c = make_config(model__vocab_size=bpe.get_vocab_size(), data__vocab=f"gpt2:{workdir}/tokenizer",
                  data__dir=str(tmp_path / "gpt2_data"), train_steps=3, eval__every_steps=3)
  convert.import_hf(str(hf_dir), str(workdir), c, log=lambda _: None)
  summary = trainer.Trainer(c, str(workdir)).run()
  assert summary["completed"] and summary["steps"] == 3
  meta = json.load(open(tmp_path / "gpt2_data" / "metadata.json"))
  assert meta["eos_id"] == eos and meta["vocab_size"] == bpe.get_vocab_size()
  tokens = np.fromfile(tmp_path / "gpt2_data" / "train.bin", np.uint16)
  assert (tokens == eos).sum() == meta["splits"]["train"]["documents"]
