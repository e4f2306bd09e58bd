"""GPT-2 checkpoints between Hugging Face's layout and ours.

  python -m slw_jax.convert --from_hf=HF_DIR --workdir=OUT --config=configs/gpt2_117m.py
  python -m slw_jax.convert --to_hf=HF_DIR --workdir=RUN [--step=N]

Import (`--from_hf`) reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` when torch is installed) and writes a
step-0 checkpoint to OUT/checkpoints: the GPT-2 weights with a fresh optimizer state, under
`--config` with the model's shape (layers, width, heads, vocabulary, context) taken from
`config.json`. Tokenizer files found beside the weights are copied to OUT/tokenizer, and
`slw_jax.evaluate --workdir=OUT` uses them. `slw_jax.main --config=... --workdir=OUT` trains on
from the imported weights.

Export (`--to_hf`) writes `config.json` and `model.safetensors` as `transformers` saves a
GPT2LMHeadModel (`GPT2LMHeadModel.from_pretrained(HF_DIR)` loads it), plus the tokenizer files
an import brought. Neither direction downloads anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys

import numpy as np
from absl import flags

from slw_jax import cli, config_diff, errors, models

_FROM_HF = flags.DEFINE_string("from_hf", None, "Import: a Hugging Face GPT-2 directory "
                               "(config.json + model.safetensors or pytorch_model.bin).")
_TO_HF = flags.DEFINE_string("to_hf", None, "Export: the directory to write config.json and "
                             "model.safetensors to (new, or without a model in it).")

# GPT-2's activation is the tanh approximation of GELU (our MLP's); "gelu" is the exact one.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
TOKENIZER_DIR = "tokenizer"  # Inside the workdir: where an import keeps its tokenizer files.
GPT2_EOS = 50256  # <|endoftext|> in GPT-2's BPE vocabulary.
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Causal-mask buffers that older GPT-2 checkpoints store next to the weights.
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


class ConvertError(errors.InputError):
  """A checkpoint that cannot be converted: the message names the file and the bad value."""


# ----- the correspondence of tensors ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter: its path in our params (a pure dict) and its name and shape in HF's.

  The two shapes hold the same values in the same order (HF's Conv1D computes x @ W, as our
  einsums do), so converting is a reshape; only the token table may carry `pad_rows` rows of
  vocabulary padding on our side (`model.vocab_pad_multiple`).
  """
  ours: tuple
  hf: str
  hf_shape: tuple
  our_shape: tuple
  pad_rows: int = 0


def tensor_table(cfg: models.GPTConfig) -> list[Tensor]:
  """Every parameter of the model, in HF GPT-2 names (without the `transformer.` prefix).
  Raises ConvertError for a model HF's GPT-2 cannot hold: import and export both come here,
  so no parameter is dropped silently."""
  if cfg.qk_norm:
    raise ConvertError("config.model.qk_norm=True: Hugging Face's GPT-2 has no LayerNorm on "
                       "queries and keys, so this model cannot be converted to or from it (its "
                       "q_norm/k_norm parameters would be lost)")
  d, h, k, f = cfg.d_model, cfg.n_head, cfg.head_dim, 4 * cfg.d_model

  def same(ours, hf, shape):
    return Tensor(ours, hf, shape, shape)

  def norm(ours, hf):
    return [same(ours + ("scale_d",), hf + ".weight", (d,)),
            same(ours + ("bias_d",), hf + ".bias", (d,))]

  table = [Tensor(("wte_vd",), "wte.weight", (cfg.vocab_size, d), (cfg.vocab_size, d),
                  cfg.padded_vocab - cfg.vocab_size),
           same(("wpe_ld",), "wpe.weight", (cfg.max_seqlen, d))]
  for i in range(cfg.n_layer):
    block, hf = ("blocks", i), f"h.{i}."
    attn, mlp = block + ("attn",), block + ("mlp",)
    table += norm(block + ("ln_1",), hf + "ln_1") + norm(block + ("ln_2",), hf + "ln_2") + [
        Tensor(attn + ("qkv_weight_dchk",), hf + "attn.c_attn.weight", (d, 3 * d), (d, 3, h, k)),
        Tensor(attn + ("qkv_bias_chk",), hf + "attn.c_attn.bias", (3 * d,), (3, h, k)),
        Tensor(attn + ("out_weight_hkd",), hf + "attn.c_proj.weight", (d, d), (h, k, d)),
        same(attn + ("out_bias_d",), hf + "attn.c_proj.bias", (d,)),
        same(mlp + ("fc_weight_df",), hf + "mlp.c_fc.weight", (d, f)),
        same(mlp + ("fc_bias_f",), hf + "mlp.c_fc.bias", (f,)),
        same(mlp + ("proj_weight_fd",), hf + "mlp.c_proj.weight", (f, d)),
        same(mlp + ("proj_bias_d",), hf + "mlp.c_proj.bias", (d,))]
  return table + norm(("ln_f",), "ln_f")


def params_from_hf(weights: dict, cfg: models.GPTConfig, source: str) -> dict:
  """Our params (a pure nested dict of float32 arrays) from HF tensors named as in
  `tensor_table`. Raises ConvertError for a missing, unexpected or misshapen tensor."""
  table = tensor_table(cfg)
  unexpected = sorted(set(weights) - {t.hf for t in table})
  if unexpected:
    raise ConvertError(f"{source} has tensor {unexpected[0]!r}, which a GPT-2 language model "
                       f"of this config does not have ({len(unexpected)} such tensors)")
  params = {}
  for t in table:
    if t.hf not in weights:
      raise ConvertError(f"{source} has no tensor {t.hf!r} (config.json describes "
                         f"{cfg.n_layer} layers)")
    value = np.asarray(weights[t.hf], np.float32)
    if value.shape != t.hf_shape:
      raise ConvertError(f"{source}: tensor {t.hf!r} has shape {value.shape}, config.json "
                         f"implies {t.hf_shape}")
    value = value.reshape(t.our_shape)
    if t.pad_rows:  # Padded vocabulary rows never score (models.GPT slices them off).
      value = np.concatenate([value, np.zeros((t.pad_rows,) + value.shape[1:], np.float32)])
    node = params
    for key in t.ours[:-1]:
      node = node.setdefault(key, {})
    node[t.ours[-1]] = value
  return params


def hf_from_params(params: dict, cfg: models.GPTConfig) -> dict:
  """HF tensors (names as in `tensor_table`) from our params (a pure nested dict)."""
  weights = {}
  for t in tensor_table(cfg):
    value = params
    for key in t.ours:
      value = value[key]
    value = np.asarray(value, np.float32)
    if t.pad_rows:
      value = value[:-t.pad_rows]
    weights[t.hf] = np.ascontiguousarray(value.reshape(t.hf_shape))
  return weights


# ----- reading Hugging Face files -------------------------------------------------------------

def _load_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ConvertError(f"{path} is not readable JSON: {error}") from None
  if not isinstance(value, dict):
    raise ConvertError(f"{path} holds a {type(value).__name__}, not a JSON object")
  return value


def _require(ok: bool, path: str, name: str, value, allowed: str):
  if not ok:
    raise ConvertError(f"{path}: {name}={value!r} is not supported: slw_jax's GPT-2 needs "
                       f"{allowed}")


def _size(hf: dict, name: str, path: str) -> int:
  value = hf.get(name)
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, path, name,
           value, "an integer >= 1")
  return value


def read_hf_config(hf_dir: str) -> dict:
  """Our `model.*` shape fields from a HF GPT-2 `config.json`, after checking that the model
  computes what ours does. Raises ConvertError naming the unsupported field."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"--from_hf={hf_dir} has no config.json (expected a Hugging Face GPT-2 "
                       "directory: config.json + model.safetensors or pytorch_model.bin)")
  hf = _load_json(path)
  _require(hf.get("model_type") == "gpt2", path, "model_type", hf.get("model_type"), "'gpt2'")
  shape = {"vocab_size": _size(hf, "vocab_size", path), "n_layer": _size(hf, "n_layer", path),
           "d_model": _size(hf, "n_embd", path), "n_head": _size(hf, "n_head", path),
           "max_seqlen": _size(hf, "n_positions", path)}
  d_model = shape["d_model"]
  is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  checks = [  # (field, value, supported, what is supported)
      ("activation_function", hf.get("activation_function", "gelu_new"),
       lambda v: v in TANH_GELUS, f"one of {', '.join(TANH_GELUS)} (tanh GELU)"),
      ("n_inner", hf.get("n_inner"), lambda v: v in (None, 4 * d_model),
       f"null or 4 * n_embd = {4 * d_model}"),
      ("layer_norm_epsilon", hf.get("layer_norm_epsilon", models.LN_EPS),
       lambda v: is_number(v) and abs(v - models.LN_EPS) <= 1e-12, f"{models.LN_EPS}"),
      ("scale_attn_weights", hf.get("scale_attn_weights", True), lambda v: v is True, "true"),
      ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False),
       lambda v: v is False, "false"),
      ("tie_word_embeddings", hf.get("tie_word_embeddings", True), lambda v: v is True,
       "true (the output head is the token embedding)"),
      ("add_cross_attention", hf.get("add_cross_attention", False), lambda v: v is False,
       "false (a decoder-only model)"),
      ("n_head", shape["n_head"], lambda v: d_model % v == 0, f"a divisor of n_embd={d_model}"),
  ]
  for name, value, ok, allowed in checks:
    _require(ok(value), path, name, value, allowed)
  return shape


def special_tokens(hf_dir: str) -> dict:
  """The bos/eos/pad token ids a HF `config.json` names (export writes them back)."""
  hf = _load_json(os.path.join(hf_dir, "config.json"))
  return {k: hf[k] for k in SPECIAL_TOKENS if isinstance(hf.get(k), int)}


def _read_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConvertError(f"{path} is a PyTorch file and torch is not installed: pip install torch, "
                       "or convert a directory with model.safetensors") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ConvertError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
  return {name: value.detach().float().numpy() for name, value in state.items()
          if isinstance(value, torch.Tensor) and value.is_floating_point()}


def _read_files(hf_dir: str) -> tuple[dict, str]:
  """(every tensor of the checkpoint by its stored name, the file read)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  binary = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.isfile(single):
    return safetensors_numpy.load_file(single), single
  if os.path.isfile(index):
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ConvertError(f"{index} has no \"weight_map\" object (shard file of each tensor)")
    raw = {}
    for shard in sorted(set(weight_map.values())):
      raw.update(safetensors_numpy.load_file(os.path.join(hf_dir, shard)))
    return raw, index
  if os.path.isfile(binary):
    return _read_torch(binary), binary
  raise ConvertError(f"--from_hf={hf_dir} has no model.safetensors, "
                     "model.safetensors.index.json or pytorch_model.bin")


def read_hf_weights(hf_dir: str) -> tuple[dict, str]:
  """(tensors by HF name without the `transformer.` prefix, the file read); the causal-mask
  buffers are dropped and a tied `lm_head.weight` is checked. Raises ConvertError."""
  try:
    raw, source = _read_files(hf_dir)
  except ConvertError:
    raise
  except Exception as error:  # safetensors, torch and pickle raise their own types.
    raise ConvertError(f"the weights in --from_hf={hf_dir} could not be read: "
                       f"{type(error).__name__}: {error}") from None
  weights = {}
  for name, value in raw.items():
    name = name.removeprefix("transformer.")
    if not _MASK_BUFFER.match(name):
      weights[name] = value
  head = weights.pop("lm_head.weight", None)
  if head is not None and "wte.weight" in weights and not np.array_equal(head,
                                                                           weights["wte.weight"]):
    raise ConvertError(f"{source}: lm_head.weight differs from wte.weight; slw_jax ties the "
                       "output head to the token embedding (untied heads are not supported)")
  return weights, source


# ----- import ---------------------------------------------------------------------------------

def take_model_shape(config, hf_model: dict, log=print) -> dict:
  """Sets `config.model`'s shape fields to the imported model's; returns (and logs) the fields
  that changed, with their new values."""
  changed = {}
  for key, value in hf_model.items():
    if config.model[key] != value:
      log(f"model.{key}: {config.model[key]} -> {value} (from config.json)")
      config.model[key] = changed[key] = value
  return changed


def _copy_tokenizer(hf_dir: str, workdir: str) -> str | None:
  """Copies GPT-2 tokenizer files to WORKDIR/tokenizer; their vocab spec (relative to the
  workdir, so the run directory can move), or None if `hf_dir` has none."""
  present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= set(present):
    return None
  os.makedirs(os.path.join(workdir, TOKENIZER_DIR), exist_ok=True)
  for name in present:
    shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, TOKENIZER_DIR, name))
  return f"gpt2:{TOKENIZER_DIR}"


def import_hf(hf_dir: str, workdir: str, c, log=print) -> dict:
  """Writes `hf_dir`'s GPT-2 as the step-0 checkpoint of a run of config `c` (whose model shape
  must be the checkpoint's: `take_model_shape`) in `workdir`; returns the checkpoint's record.
  Refuses a workdir that already holds checkpoints."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from slw_jax import checkpoint, input_pipeline, monitor, train_step
  directory = os.path.join(workdir, "checkpoints")
  if os.path.isdir(directory) and os.listdir(directory):
    raise ConvertError(f"--workdir={workdir} already holds checkpoints: import into a new "
                       "directory (nothing was overwritten)")
  tokens = special_tokens(hf_dir)
  weights, source = read_hf_weights(hf_dir)
  count = sum(x.size for x in weights.values())
  pure = params_from_hf(weights, models.GPTConfig.from_config(c.model), source)
  del weights  # Only the converted copy is needed from here on.
  checkpoints = checkpoint.Checkpoints(directory, c.checkpoint.keep, async_save=False)
  try:
    placed = train_step.on_mesh(config_diff.on_one_device(c.to_dict()), jax.devices()[:1])
    params = jax.tree.map(lambda x: x, placed.state_spec["params"])  # A copy to fill in.
    if c.model.scan_layers:  # HF keeps one tensor per layer.
      pure = models.restack_blocks(pure, nnx.to_pure_dict(params), c.model.n_layer)
    nnx.replace_by_pure_dict(params, pure)
    make_state = jax.jit(lambda p: train_step.state_from_params(p, placed.optimizer),
                         out_shardings=placed.layout.state)
    meta = checkpoint.record(
        0, 0, input_pipeline.loader_state(0, c.data.mode, c.seed, c.pacing.seqlen_end, 0),
        monitor.StabilityMonitor(c.monitor).state(), c.to_dict(),
        imported_from=os.path.abspath(source), special_tokens=tokens,
        vocab=_copy_tokenizer(hf_dir, workdir))
    checkpoints.save(0, make_state(params), meta)
  finally:
    checkpoints.close()
  log(f"imported {count:,} parameters from {source} into {checkpoints.directory} (step 0)")
  return meta


# ----- export ---------------------------------------------------------------------------------

def hf_config(cfg: models.GPTConfig, dropout: float, tokens: dict,
              attention_dropout: float = 0.0) -> dict:
  """A `config.json` that `transformers`' GPT2LMHeadModel reads as this model (with the run's
  dropout rates, for whoever fine-tunes it)."""
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seqlen, "n_embd": cfg.d_model,
          "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
          "activation_function": TANH_GELUS[0], "layer_norm_epsilon": models.LN_EPS,
          "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": attention_dropout,
          "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
          "bos_token_id": None, "eos_token_id": None, **tokens, "dtype": "float32"}


def _export_tokens(meta: dict, vocab: str | None, vocab_size: int) -> dict:
  """The special token ids to export: an import's own, else the vocabulary's end of text."""
  if "special_tokens" in meta:
    return meta["special_tokens"]
  kind = (vocab or "").partition(":")[0]
  eos = {"byte": 1, "gpt2": GPT2_EOS if GPT2_EOS < vocab_size else None}.get(kind)
  return {"bos_token_id": eos, "eos_token_id": eos}


def _check_export_target(out_dir: str):
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConvertError(f"--to_hf={out_dir} is a file, not a directory")
  existing = [n for n in ("config.json", "model.safetensors", "model.safetensors.index.json",
                          "pytorch_model.bin") + TOKENIZER_FILES
              if os.path.exists(os.path.join(out_dir, n))]
  if existing:
    raise ConvertError(f"--to_hf={out_dir} already has {existing[0]}: export into a new "
                       "directory (nothing was overwritten)")


def export_hf(workdir: str, step: int | None, out_dir: str, mirror_dir: str | None = None,
              log=print) -> str:
  """Writes a run's checkpoint to `out_dir` in HF GPT-2 layout; returns the weights' path.
  Refuses to overwrite a model or tokenizer already in `out_dir`. `workdir` may be a URL
  (read through a local mirror in `mirror_dir`: slw_jax.remote_run)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  from slw_jax import checkpoint, remote_run, run_log  # pylint: disable=g-import-not-at-top
  _check_export_target(out_dir)
  local = remote_run.open_for_reading(workdir, mirror_dir, "newest" if step is None else step)
  loaded = checkpoint.load_params(local.local, step)
  cfg = models.GPTConfig.from_config(loaded.config.model)
  pure = nnx.to_pure_dict(jax.device_get(loaded.params))
  if cfg.scan_layers:  # HF keeps one tensor per layer.
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    target = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.GPT(unrolled, nnx.Rngs(0))),
                                        nnx.Param))
    pure = jax.device_get(models.restack_blocks(pure, target, cfg.n_layer))
  weights = {"transformer." + n: x for n, x in hf_from_params(pure, cfg).items()}
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "model.safetensors")
  partial = os.path.join(out_dir, ".model.safetensors.partial")
  safetensors_numpy.save_file(weights, partial, metadata={"format": "pt"})
  os.replace(partial, path)  # Atomic: a killed export leaves no truncated model file.
  tokens = _export_tokens(loaded.meta, loaded.vocab, cfg.vocab_size)
  run_log.write_json(os.path.join(out_dir, "config.json"),
                     hf_config(cfg, loaded.config.model.dropout, tokens,
                               loaded.config.model.attention_dropout))
  kind, _, tokenizer_dir = (loaded.vocab or "").partition(":")
  if kind == "gpt2" and os.path.isdir(tokenizer_dir):
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  log(f"exported step {loaded.step} of {workdir} ({sum(x.size for x in weights.values()):,} "
      f"parameters) to {out_dir}")
  return path


# ----- command line ---------------------------------------------------------------------------

_USAGE = ("pass --from_hf=HF_DIR --workdir=OUT --config=CONFIG (import) or --to_hf=HF_DIR "
          "--workdir=RUN (export)")


def _next_steps(argv, workdir: str, meta: dict, changed: dict,
                needs_source: bool = False, local: str | None = None) -> list[str]:
  """What to run after an import: evaluation, and training on with the model's shape.
  `local`: where the workdir's files are on this machine (a URL's mirror)."""
  lines = [f"evaluate: python -m slw_jax.evaluate --workdir={workdir} --task=lambada "
           f"--data=PATH" + ("" if meta["vocab"] else " --vocab=gpt2:PATH (no tokenizer files "
                             "came with the weights)")]
  overrides = [a for a in argv[1:] if a.startswith(("--config.", "-config."))]
  overrides += [f"--config.model.{k}={v}" for k, v in changed.items()]
  if meta["vocab"]:  # Data in this tokenizer's ids (prepared with it: slw_jax.prepare).
    tokenizer = os.path.join(os.path.abspath(local or workdir), meta["vocab"].partition(":")[2])
    overrides = [a for a in overrides if not a.split("=")[0].endswith("config.data.vocab")]
    overrides.append(f"--config.data.vocab=gpt2:{tokenizer}")
  if needs_source:  # A paper config: no default corpus.
    overrides.append("--config.data.source='files:YOUR_CORPUS/*.jsonl'")
  lines.append(f"train on: python -m slw_jax.main --config={cli.config_path(argv)} "
               f"--workdir={workdir} {' '.join(overrides)}".rstrip())
  return lines


EXAMPLE = "python -m slw_jax.convert --to_hf=exported/ --workdir=runs/tiny"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.CONFIG, cli.WORKDIR, cli.STEP, cli.MIRROR_DIR))
  changed = {}

  def take_shape(config):  # Between the overrides and validation (cli.parse_config).
    if _FROM_HF.value and not _TO_HF.value:
      changed.update(take_model_shape(config, read_hf_config(_FROM_HF.value)))

  with cli.exit_on_bad_input():
    c = cli.parse_config(argv, adjust=take_shape) if cli.config_path(argv) else None
    positional = cli.parse_flags(argv)[1:] if c is None else []
    if bool(_FROM_HF.value) == bool(_TO_HF.value) or not cli.WORKDIR.value or positional:
      raise errors.UsageError(_USAGE)
    if _FROM_HF.value:
      if c is None:
        raise errors.UsageError("--from_hf needs --config=CONFIG: the recipe the imported model "
                                "trains under (its shape comes from config.json)")
      from slw_jax import remote_run  # pylint: disable=g-import-not-at-top
      run_dir = remote_run.open_run(cli.WORKDIR.value, cli.MIRROR_DIR.value)
      meta = import_hf(_FROM_HF.value, run_dir.local, c)
      run_dir.close()  # A URL: the checkpoint copied to the bucket.
      print("\n".join(_next_steps(argv, cli.WORKDIR.value, meta, changed,
                                   needs_source=c.data.source is None, local=run_dir.local)))
    else:
      if c is not None:
        raise errors.UsageError("--to_hf exports with the run's own config: drop --config")
      export_hf(cli.WORKDIR.value, cli.STEP.value, _TO_HF.value, cli.MIRROR_DIR.value)


if __name__ == "__main__":
  main()
