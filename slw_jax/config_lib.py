"""The config schema (`base_config`), its validation (`validate`) and loading helpers.

Every entry point loads a `configs/<name>.py` file whose `get_config()` starts from
`base_config()`, applies command-line overrides, then calls `validate()` once. `validate`
raises `ValueError` naming the field, the bad value and what is allowed, and returns a frozen
copy in which defaults that depend on other fields are filled in (`pacing.seqlen_end`,
`optim.decay_tokens` / `optim.decay_steps`).
"""

from __future__ import annotations

import math
import os

from ml_collections import config_dict

from slw_jax import data_spec, errors, pacing, wandb_log
from slw_jax.errors import ConfigError

PACING_KINDS = ("none", "linear", "root", "discrete", "adaptive")
MESH_AXES = ("data", "fsdp", "tensor")
# Logical axes of the model's parameters (models.py) plus the batch.
LOGICAL_AXES = ("batch", "embed", "heads", "kv", "mlp", "vocab")
# dot_product: jax.nn.dot_product_attention's XLA path; cudnn: its cuDNN fused kernel (GPU,
# bfloat16); splash: the Pallas splash-attention kernel (TPU). attention.resolve_attention.
ATTENTION_KINDS = ("auto", "dot_product", "blockwise", "cudnn", "splash")
REMAT_KINDS = ("none", "block", "dots")
# fused: the head's matmul and the cross-entropy by token chunks, gradients formed in the forward
# pass (bf16 matmuls, no whole float32 [tokens, vocab] tensor); full: whole float32 logits,
# differentiated by autodiff (before 2026-12-03 the head of model.remat=none; remat chunked it).
# head_loss.fused_loss_sum.
LOSS_HEADS = ("fused", "full")
# hash: a counter hash of (row, position, feature) and a per-layer seed; threefry: JAX's
# threefry bits (the masks before 2026-12-03). models.PositionKeyedDropout.
DROPOUT_RNGS = ("hash", "threefry")
SCAN_LAYERS_FROM = 12  # model.scan_layers defaults to true from this many blocks up.
DTYPES = ("float32", "bfloat16")
MONITOR_ACTIONS = ("log", "skip", "rollback")
WANDB_MODES = ("online", "offline")


def base_config() -> config_dict.ConfigDict:
  """Every key a run understands, with defaults. Locked: unknown keys are errors."""
  c = config_dict.ConfigDict()
  c.seed = 0  # PRNG seed for parameters, data order and dropout.
  c.batch_size = 512  # Global batch size in sequences (the final one under batch warmup).
  c.train_tokens = config_dict.placeholder(int)  # Stop once this many tokens are consumed.
  c.train_steps = config_dict.placeholder(int)  # Or after this many steps (first reached wins).

  c.model = m = config_dict.ConfigDict()
  m.n_layer = 12  # Transformer blocks.
  m.d_model = 768  # Residual stream width.
  m.n_head = 12  # Attention heads; must divide d_model.
  m.vocab_size = 50257  # Tokens the vocabulary defines.
  m.vocab_pad_multiple = 1  # Pad the embedding table to a multiple of this (e.g. 128) for speed.
  m.max_seqlen = 1024  # Context length: size of the position embedding.
  m.dtype = "float32"  # Compute dtype (parameters are always float32): float32 | bfloat16.
  m.dropout = 0.0  # Dropout on embeddings and residual branches.
  m.attention_dropout = 0.0  # Dropout on attention probabilities (runs blockwise attention).
  m.attention = "auto"  # auto | dot_product | blockwise | cudnn | splash (auto: per backend+dtype).
  m.attention_block = 128  # Query block of blockwise attention (keys after a block are skipped).
  m.remat = "none"  # Recompute in the backward pass: none | block (whole blocks) | dots.
  m.loss_head = "fused"  # Output head + loss: fused (token chunks, bf16 matmuls) | full.
  m.loss_chunk_tokens = 8192  # Tokens per chunk of the fused head (whole rows); 0 = one chunk.
  m.dropout_rng = "hash"  # Residual/embedding dropout masks: hash (cheap) | threefry.
  # LayerNorm on each head's queries and keys before the scores (scale and bias per head).
  m.qk_norm = False
  # Stack the blocks and apply them with lax.scan: compile time stops growing with depth.
  m.scan_layers = config_dict.placeholder(bool)  # Default: true from 12 blocks up.

  c.pacing = p = config_dict.ConfigDict()
  p.kind = "linear"  # none | linear | root | discrete.
  p.seqlen_start = 8  # First sequence length of the warmup (linear, root).
  p.seqlen_end = config_dict.placeholder(int)  # Full length; default model.max_seqlen.
  p.duration_steps = 1000  # T: steps until seqlen_end is reached (linear, root).
  p.root_degree = 2.0  # r in (t/T)**(1/r) (root).
  p.multiple = 8  # Sequence lengths are rounded down to a multiple of this.
  p.stages = ((128, 999),)  # discrete: ((seqlen, last_step), ...); seqlen_end after the last.
  # adaptive: closed-loop SLW (slw_jax.adaptive, docs/adaptive-pacing.md). From seqlen_start,
  # one rung (pacing.multiple, or the next compile.pad_multiple bucket) at a time, decided
  # every `every_steps` steps from the signals of the last window; never below the deadline.
  p.adaptive = a = config_dict.ConfigDict()
  # Steps per decision, and the window its signals cover: 20 averages out a step's noise and
  # climbs 8 -> 1024 by 8 in ~2,540 quiet steps; 10 grew too fast for the best final loss in the
  # study (experiments/stability: adaptive_fast), though no less stably.
  a.every_steps = 20
  # An excursion (hold): loss / min previous loss above this (monitor.ratio_threshold's value).
  a.max_loss_ratio = 1.2
  # ... or the gradient norm above this times its rolling median (a doubling: clipping-scale).
  a.grad_norm_factor = 2.0
  # ... or adam_nu_max above this times its rolling median (the monitor's spike rule).
  a.nu_max_factor = 2.0
  # Steps in the rolling medians (2.5 windows: a median that settles within a few decisions).
  a.median_window = 50
  # A spike (a non-finite value, or a loss ratio above monitor.skip_ratio) in the window steps
  # back one rung instead of holding. Off: the study did not show it helps (NOTES.md).
  a.backoff = False
  # The deadline: the length is at least a linear ramp from seqlen_start that reaches
  # seqlen_end once this fraction of train_tokens or of train_steps (whichever comes first) is
  # reached, so every run ends at full length whatever its signals.
  a.deadline_fraction = 0.25

  c.batch_warmup = b = config_dict.ConfigDict()
  b.start = 0  # First batch size (sequences); 0 turns batch-size warmup off.
  b.tokens = 0  # Tokens over which the batch size rises linearly to batch_size.
  b.multiple = 1  # Batch sizes are rounded down to a multiple of this (data-parallel size).
  b.allow_with_slw = False  # Permit batch warmup together with sequence length warmup.

  c.data = d = config_dict.ConfigDict()
  # pystdlib | files:GLOB (.txt/.jsonl) | tfds:NAME:VERSION | megatron:PREFIX | hf:PATH (a
  # datasets.save_to_disk directory) | hf_files:GLOB (.parquet/.arrow/.jsonl shards).
  d.source = "pystdlib"
  d.vocab = "byte"  # byte (seqio's byte ids) | spm:PATH (SentencePiece) | gpt2:PATH (GPT-2 BPE).
  # Prepared data: a directory, or a gs:// / s3:// URL of one; default data/<source>_<vocab>.
  d.dir = config_dict.placeholder(str)
  # Where a data.dir URL is staged (the loader memory-maps files); unset: ~/.cache/slw_jax/data.
  d.cache_dir = config_dict.placeholder(str)
  d.val_fraction = 0.01  # Documents held out for validation (pystdlib, files, megatron).
  d.text_key = "text"  # Text field of .jsonl lines, TFDS examples and hf datasets.
  d.tfds_data_dir = config_dict.placeholder(str)  # TFDS data_dir (tfds sources).
  d.tfds_train_split = "train"  # TFDS split prepared as train.
  d.tfds_val_split = "validation"  # TFDS split prepared as validation.
  d.hf_train_split = "train"  # hf / hf_files split prepared as train.
  d.hf_val_split = "validation"  # ... as validation (absent: val_fraction of train held out).
  d.mode = "truncate"  # truncate (the paper) | reshape (split windows: no token dropped).
  d.prefetch = 2  # Batches prepared ahead by a background thread; 0 = none.
  d.verify_max_bytes = 2**31  # Checksum token files up to this size at start (size always).

  c.eval = e = config_dict.ConfigDict()
  e.every_steps = 500  # Validation loss at full length every this many steps (and at the end).
  e.batches = 8  # Validation batches per evaluation.
  e.batch_size = config_dict.placeholder(int)  # Default: batch_size.

  c.checkpoint = k = config_dict.ConfigDict()
  k.every_steps = 1000  # Save every this many steps (and at the end, and on SIGTERM/SIGINT).
  k.keep = 3  # Checkpoints kept (older ones are deleted).
  k.async_save = True  # Save in the background while training continues.
  # SIGTERM/SIGINT: finish the step, save, exit 0 within this many seconds of the signal; a
  # save that cannot finish in time is abandoned (the previous checkpoint stays the newest).
  # 30 s: the grace period of Kubernetes, SLURM's KillWait and GCE spot preemption.
  k.preemption_timeout_s = 30.0
  k.upload_every_s = 10.0  # A gs:// or s3:// --workdir: copy what changed this often.

  c.monitor = mon = config_dict.ConfigDict()
  mon.ratio_threshold = 1.2  # A step with loss / min previous loss above this is "unstable".
  mon.action = "log"  # log | skip (drop bad updates in the step) | rollback (restore, skip data).
  # A bad step: non-finite loss or gradient norm, or loss ratio above this (skip, rollback).
  mon.skip_ratio = 2.0
  mon.max_rollbacks = 3  # Rollbacks allowed before the run stops with an error.
  mon.max_bad_in_a_row = 20  # Consecutive bad steps (any action) before the run stops.
  mon.spike_window = 100  # Steps in the rolling median adam_nu_max spikes are measured against.
  mon.spike_factor = 2.0  # adam_nu_max above this times its rolling median counts as a spike.

  # The paper's low-cost tuner (python -m slw_jax.tune, Sec. 4): trials of the early steps pick
  # pacing.seqlen_start, then the largest pacing.duration_steps whose validation stays steady.
  c.tune = t = config_dict.ConfigDict()
  t.seqlen_starts = ()  # Starts tried in order; () = pacing.multiple x 1, 2, 4, 8, 16.
  t.first_duration_warmups = 4  # T while the start is tuned, in LR-warmup lengths.
  t.max_duration_warmups = 32  # The largest T the search tries, in LR-warmup lengths.
  t.start_window_warmups = 1.0  # A start's trial: this many warmup lengths ("the beginning").
  t.window_warmups = 3.0  # A T trial: this many warmup lengths ("first few multiples").
  t.search_trials = 4  # Bisection trials for T after its two ends.
  t.evals_per_warmup = 4  # Validation points per warmup length in each trial.
  t.eval_batches = 2  # Validation batches per point (the same windows every time).
  t.rise_tolerance = 0.05  # A fluctuation: val perplexity above its running min by this much.
  t.max_cost_fraction = 0.10  # Refuse a plan whose trials could cost more of the run's tokens.

  c.compile = cc = config_dict.ConfigDict()
  cc.background = True  # Compile upcoming buckets in a background thread while training.
  cc.ahead = 2  # How many upcoming buckets to compile ahead.
  cc.cache_dir = config_dict.placeholder(str)  # JAX persistent compilation cache; "" = off.
  cc.threads = config_dict.placeholder(int)  # Buckets compiled in parallel; default cores/2, <= 4.
  # Run length L in the bucket ceil(L / M) * M, right-padded, pad masked out of the loss:
  # fewer compiles for some padded compute. Unset: one bucket per pacing.multiple.
  cc.pad_multiple = config_dict.placeholder(int)
  # Let XLA:GPU's rematerialization pass recompute to fit memory. Off (MaxText's GPU recipes):
  # a step's memory analysis is then its true need, so optim.microbatches=auto never accepts a
  # count that fits only by recomputation XLA chose; model.remat is how to trade compute.
  cc.xla_remat = False

  c.log = lg = config_dict.ConfigDict()
  lg.every_steps = 1  # metrics.jsonl / TensorBoard row every this many steps.
  lg.print_every_steps = 10  # Plain log line every this many steps when not on a terminal.
  lg.wandb_project = ""  # Weights & Biases project to log to; empty: W&B off (docs/cloud.md).
  lg.wandb_entity = ""  # W&B entity (user or team); empty: the account's default.
  lg.wandb_name = ""  # W&B run name; empty: the workdir's name.
  lg.wandb_mode = "online"  # online | offline (files under WORKDIR/wandb, for `wandb sync`).

  c.mesh = mesh = config_dict.ConfigDict()
  mesh.data = -1  # Data-parallel size; -1 = the devices left over by the other two axes.
  mesh.fsdp = 1  # Parameter/optimizer-state sharding (ZeRO-3 style) size; the batch too.
  mesh.tensor = 1  # Tensor-parallel size (heads, MLP hidden and vocabulary are split).
  # Logical axis -> mesh axes (a name, a tuple of names, or None = replicated); see
  # docs/accelerators.md.
  mesh.rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                ("kv", None), ("mlp", "tensor"), ("vocab", "tensor"))
  mesh.allow_replicated = False  # Replicate a dimension its mesh axes do not divide (else error).

  c.hardware = h = config_dict.ConfigDict()
  h.peak_flops = 0.0  # Peak FLOP/s per device for MFU; 0 = known default or measured (CPU).
  h.allow_cpu = False  # Train on the CPU even where accelerator wheels are installed.

  c.distributed = dist = config_dict.ConfigDict()
  dist.timeout_s = 100  # Seconds until a dead or silent process makes the others abort.

  c.optim = o = config_dict.ConfigDict()
  o.lr = 6e-4  # Peak learning rate.
  o.min_lr = 6e-5  # Floor of the cosine decay.
  o.warmup_steps = 0  # Linear LR warmup by optimizer steps ...
  o.warmup_tokens = 0  # ... or by tokens consumed (set at most one of the two).
  o.decay_tokens = config_dict.placeholder(int)  # Cosine decay ends here; default train_tokens.
  o.decay_steps = config_dict.placeholder(int)  # Step-based cosine instead (baseline runs).
  o.b1 = 0.9  # Adam beta1.
  o.b2 = 0.999  # Adam beta2.
  o.eps = 1e-8  # Adam epsilon.
  o.weight_decay = 0.01  # Decoupled weight decay (matrices and embeddings only).
  o.clip_norm = 1.0  # Global-norm gradient clipping; 0 turns it off.
  # PaLM's z-loss: this times the mean over real tokens of log(Z)^2 joins the training loss
  # (logged as z_loss; the loss metric stays the cross-entropy). 0 turns it off.
  o.z_loss = 0.0
  # Microbatches of the largest bucket (gradients accumulated in float32 inside the step);
  # "auto": the fewest that fit the device memory. Shorter buckets use as few as keep tokens per
  # microbatch at most the largest bucket's.
  o.microbatches = config_dict.FieldReference(1, field_type=object)

  c.lock()
  return c


_fail, _check, _is_int = errors.config_fail, errors.config_check, errors.is_int


def _validate_model(m):
  for name in ("n_layer", "d_model", "n_head", "vocab_size", "max_seqlen", "vocab_pad_multiple"):
    _check(_is_int(m[name]) and m[name] >= 1, f"model.{name}", m[name], "must be an integer >= 1")
  _check(m.d_model % m.n_head == 0, "model.n_head", m.n_head,
         f"must divide model.d_model={m.d_model}")
  _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"must be one of {', '.join(DTYPES)}")
  _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
  _check(isinstance(m.attention_dropout, (int, float)) and 0.0 <= m.attention_dropout < 1.0,
         "model.attention_dropout", m.attention_dropout, "must be in [0, 1)")
  _check(m.attention in ATTENTION_KINDS, "model.attention", m.attention,
         f"must be one of {', '.join(ATTENTION_KINDS)}")
  _check(_is_int(m.attention_block) and m.attention_block >= 1, "model.attention_block",
         m.attention_block, "must be an integer >= 1")
  _check(m.remat in REMAT_KINDS, "model.remat", m.remat, f"must be one of {', '.join(REMAT_KINDS)}")
  _check(m.scan_layers is None or isinstance(m.scan_layers, bool), "model.scan_layers",
         m.scan_layers, f"must be true or false (unset: true from {SCAN_LAYERS_FROM} blocks up)")
  _check(m.loss_head in LOSS_HEADS, "model.loss_head", m.loss_head,
         f"must be one of {', '.join(LOSS_HEADS)}")
  _check(_is_int(m.loss_chunk_tokens) and m.loss_chunk_tokens >= 0, "model.loss_chunk_tokens",
         m.loss_chunk_tokens, "must be an integer >= 0 (0 = the whole batch in one chunk)")
  _check(m.dropout_rng in DROPOUT_RNGS, "model.dropout_rng", m.dropout_rng,
         f"must be one of {', '.join(DROPOUT_RNGS)}")
  _validate_hash_ids(m)
  _check(isinstance(m.qk_norm, bool), "model.qk_norm", m.qk_norm, "must be true or false")
  _check(m.attention != "cudnn" or m.dtype == "bfloat16", "model.attention", m.attention,
         f"cuDNN fused attention needs model.dtype=bfloat16 (not {m.dtype!r}); use auto, "
         "dot_product or blockwise with float32")


def _validate_cudnn_dropout(m):
  """cuDNN's own attention dropout keeps one RNG offset per compiled call that advances each
  run: under scanned layers one call serves every layer and the backward scan runs them in
  reverse, so a layer's backward would drop other probabilities than its forward (until a
  device run of benchmarks/cudnn_dropout_probe.py shows otherwise)."""
  _check(not (m.attention == "cudnn" and m.attention_dropout > 0 and m.scan_layers),
         "model.attention", m.attention, "cuDNN's attention dropout (model.attention_dropout="
         f"{m.attention_dropout}) needs model.scan_layers=false: scanned layers would pair a "
         "layer's backward with another layer's masks; use auto (XLA attention, hashed masks)")


def _validate_hash_ids(m):
  """Hashed dropout numbers positions in uint32: they must stay unique."""
  _check(not (m.dropout > 0 and m.dropout_rng == "hash") or m.max_seqlen * m.d_model < 2**32,
         "model.dropout_rng", m.dropout_rng, f"hash numbers (position, feature) pairs in 32 "
         f"bits, and model.max_seqlen x model.d_model = {m.max_seqlen * m.d_model:,} does not "
         "fit: use threefry")
  _check(not m.attention_dropout > 0 or m.max_seqlen**2 < 2**32, "model.attention_dropout",
         m.attention_dropout, f"its hashed masks number (query, key) pairs in 32 bits: "
         f"model.max_seqlen={m.max_seqlen} must be below 65536")


def _validate_stages(p, seqlen_end):
  stages = p.stages
  _check(isinstance(stages, (tuple, list)) and len(stages) > 0, "pacing.stages", stages,
         "discrete pacing needs a non-empty list of (seqlen, last_step) pairs")
  previous_last = -1
  for stage in stages:
    ok = (isinstance(stage, (tuple, list)) and len(stage) == 2 and all(map(_is_int, stage)))
    _check(ok, "pacing.stages", stages, f"entry {stage!r} must be a (seqlen, last_step) pair")
    seqlen, last_step = stage
    _check(1 <= seqlen <= seqlen_end and seqlen % p.multiple == 0, "pacing.stages", stages,
           f"stage seqlen {seqlen} must be a multiple of pacing.multiple={p.multiple} "
           f"in [1, seqlen_end={seqlen_end}]")
    _check(last_step > previous_last, "pacing.stages", stages,
           "last_step values must be >= 0 and strictly increasing")
    previous_last = last_step


def _validate_pacing(p, model):
  _check(p.kind in PACING_KINDS, "pacing.kind", p.kind, f"must be one of {', '.join(PACING_KINDS)}")
  _check(_is_int(p.multiple) and p.multiple >= 1, "pacing.multiple", p.multiple,
         "must be an integer >= 1")
  end = p.seqlen_end
  _check(_is_int(end) and 1 <= end <= model.max_seqlen, "pacing.seqlen_end", end,
         f"must be an integer in [1, model.max_seqlen={model.max_seqlen}]")
  _check(end % p.multiple == 0, "pacing.seqlen_end", end,
         f"must be a multiple of pacing.multiple={p.multiple}")
  if p.kind in ("linear", "root"):
    # Lengths round down to the multiple (DeepSpeed's rule): a smaller start would give 0.
    _check(_is_int(p.seqlen_start) and p.multiple <= p.seqlen_start <= end,
           "pacing.seqlen_start", p.seqlen_start, f"must be an integer in [pacing.multiple="
           f"{p.multiple}, pacing.seqlen_end={end}] (lengths round down to a multiple of "
           "pacing.multiple)")
    _check(_is_int(p.duration_steps) and p.duration_steps > 0, "pacing.duration_steps",
           p.duration_steps, f"must be an integer > 0 with pacing.kind={p.kind!r}")
  if p.kind == "root":
    _check(p.root_degree > 0, "pacing.root_degree", p.root_degree, "must be > 0")
  if p.kind == "discrete":
    _validate_stages(p, end)
  if p.kind == "adaptive":
    _validate_adaptive(p)


def _validate_adaptive(p):
  a, end = p.adaptive, p.seqlen_end
  _check(_is_int(p.seqlen_start) and p.multiple <= p.seqlen_start <= end, "pacing.seqlen_start",
         p.seqlen_start, f"must be an integer in [pacing.multiple={p.multiple}, "
         f"pacing.seqlen_end={end}] (lengths round down to a multiple of pacing.multiple)")
  for name in ("every_steps", "median_window"):
    _check(_is_int(a[name]) and a[name] >= 1, f"pacing.adaptive.{name}", a[name],
           "must be an integer >= 1")
  _check(isinstance(a.max_loss_ratio, (int, float)) and a.max_loss_ratio > 1,
         "pacing.adaptive.max_loss_ratio", a.max_loss_ratio, "must be a number > 1")
  for name in ("grad_norm_factor", "nu_max_factor"):
    _check(isinstance(a[name], (int, float)) and a[name] > 1, f"pacing.adaptive.{name}",
           a[name], "must be a number > 1 (a multiple of the rolling median)")
  _check(isinstance(a.backoff, bool), "pacing.adaptive.backoff", a.backoff, "must be true or false")
  _check(isinstance(a.deadline_fraction, (int, float)) and 0 < a.deadline_fraction < 1,
         "pacing.adaptive.deadline_fraction", a.deadline_fraction,
         "must be a number in (0, 1): the share of the run by which seqlen_end is reached")


def _validate_batch_warmup(c):
  b = c.batch_warmup
  _check(_is_int(b.start) and b.start >= 0, "batch_warmup.start", b.start,
         "must be an integer >= 0 (0 turns batch warmup off)")
  if b.start == 0:
    return
  _check(_is_int(b.multiple) and b.multiple >= 1, "batch_warmup.multiple", b.multiple,
         "must be an integer >= 1")
  _check(b.start <= c.batch_size, "batch_warmup.start", b.start,
         f"must be <= batch_size={c.batch_size}")
  _check(c.batch_size % b.multiple == 0, "batch_size", c.batch_size,
         f"must be a multiple of batch_warmup.multiple={b.multiple}")
  _check(_is_int(b.tokens) and b.tokens > 0, "batch_warmup.tokens", b.tokens,
         "must be an integer > 0 when batch_warmup.start > 0")
  _check(c.pacing.kind == "none" or b.allow_with_slw, "batch_warmup.start", b.start,
         f"batch warmup together with pacing.kind={c.pacing.kind!r} needs "
         "batch_warmup.allow_with_slw=True (the paper disables it under SLW)")


def _validate_stop(c):
  for name in ("train_tokens", "train_steps"):
    value = c[name]
    _check(value is None or (_is_int(value) and value > 0), name, value,
           "must be an integer > 0, or unset")
  if c.train_tokens is None and c.train_steps is None:
    _fail("train_tokens", None, "set train_tokens or train_steps (or both: first reached wins)")
  _check(_is_int(c.batch_size) and c.batch_size >= 1, "batch_size", c.batch_size,
         "must be an integer >= 1")


def _validate_log(lg):
  for key in ("wandb_project", "wandb_entity", "wandb_name"):
    _check(isinstance(lg[key], str), f"log.{key}", lg[key], "must be a string")
  _check(lg.wandb_mode in WANDB_MODES, "log.wandb_mode", lg.wandb_mode,
         f"must be one of {', '.join(WANDB_MODES)}")
  if lg.wandb_project and not wandb_log.installed():
    raise ConfigError(f"config.log.wandb_project={lg.wandb_project!r} needs the wandb package, "
                      f"which is not installed: pip install {wandb_log.PACKAGE} (or leave it "
                      "empty)")


def _validate_runtime(c):
  for name in ("eval.every_steps", "eval.batches", "checkpoint.every_steps", "checkpoint.keep",
               "log.every_steps", "log.print_every_steps", "monitor.spike_window",
               "monitor.max_rollbacks", "monitor.max_bad_in_a_row"):
    group, field = name.split(".")
    value = c[group][field]
    _check(_is_int(value) and value >= (0 if field == "max_rollbacks" else 1), name, value,
           "must be an integer >= 1" if field != "max_rollbacks" else "must be an integer >= 0")
  _check(c.eval.batch_size is None or (_is_int(c.eval.batch_size) and c.eval.batch_size >= 1),
         "eval.batch_size", c.eval.batch_size, "must be an integer >= 1, or unset")
  for name in ("preemption_timeout_s", "upload_every_s"):
    seconds = c.checkpoint[name]
    _check(isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0,
           f"checkpoint.{name}", seconds, "must be a number of seconds > 0")
  m = c.monitor
  _check(m.action in MONITOR_ACTIONS, "monitor.action", m.action,
         f"must be one of {', '.join(MONITOR_ACTIONS)}")
  _check(m.ratio_threshold > 1, "monitor.ratio_threshold", m.ratio_threshold, "must be > 1")
  _check(m.skip_ratio > 1, "monitor.skip_ratio", m.skip_ratio, "must be > 1")
  _check(m.spike_factor > 1, "monitor.spike_factor", m.spike_factor, "must be > 1")
  _validate_compile(c)
  _check(c.hardware.peak_flops >= 0, "hardware.peak_flops", c.hardware.peak_flops,
         "must be >= 0 (0 = known default or measured)")
  _check(_is_int(c.distributed.timeout_s) and c.distributed.timeout_s >= 1,
         "distributed.timeout_s", c.distributed.timeout_s, "must be an integer >= 1 (seconds)")
  _validate_mesh(c.mesh)
  _check(m.action != "rollback" or c.checkpoint.keep >= 2, "checkpoint.keep", c.checkpoint.keep,
         "must be >= 2 with monitor.action='rollback' (a checkpoint older than the spike)")


MAX_DEFAULT_COMPILE_THREADS = 4  # Each paper-scale compile can take GBs of host memory.


def default_compile_threads() -> int:
  """Half the cores this process may use (its affinity, e.g. a container's), 1 to 4."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 2
  return max(1, min(MAX_DEFAULT_COMPILE_THREADS, cores // 2))


def _validate_compile(c):
  cc = c.compile
  _check(_is_int(cc.ahead) and cc.ahead >= 0, "compile.ahead", cc.ahead,
         "must be an integer >= 0")
  _check(_is_int(cc.threads) and cc.threads >= 1, "compile.threads", cc.threads,
         "must be an integer >= 1 (unset: half the host's cores, at most 4)")
  m, end = cc.pad_multiple, c.pacing.seqlen_end
  _check(m is None or (_is_int(m) and m >= 1 and m % c.pacing.multiple == 0 and m <= end),
         "compile.pad_multiple", m, f"must be a positive multiple of pacing.multiple="
         f"{c.pacing.multiple} up to the context pacing.seqlen_end={end}, or unset (no padding)")


def rule_axes(target) -> tuple:
  """The mesh axes of a `mesh.rules` target: a name, a tuple of names, or None."""
  return tuple(target) if isinstance(target, (tuple, list)) else (target,)


def _validate_mesh(mesh):
  sizes = {axis: mesh[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    _check(_is_int(size) and (size >= 1 or size == -1), f"mesh.{axis}", size,
           "must be an integer >= 1, or -1 (fill with the remaining devices)")
  _check(list(sizes.values()).count(-1) <= 1, "mesh", sizes, "at most one axis may be -1")
  rules = mesh.rules
  ok = isinstance(rules, (tuple, list)) and all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in rules)
  _check(ok, "mesh.rules", rules, "must be a list of (logical_axis, mesh_axes) pairs")
  logical_names = [r[0] for r in rules]
  for logical, target in rules:
    _check(logical in LOGICAL_AXES, "mesh.rules", (logical, target),
           f"the logical axis must be one of {', '.join(LOGICAL_AXES)}")
    _check(logical_names.count(logical) == 1, "mesh.rules", (logical, target),
           "each logical axis may have one rule only")
    names = rule_axes(target)
    _check(all(n is None or n in MESH_AXES for n in names), "mesh.rules", (logical, target),
           f"mesh axes must be among {', '.join(MESH_AXES)} (or None)")
    _check(len(set(names)) == len(names), "mesh.rules", (logical, target),
           "a mesh axis may appear once per rule")


def _validate_tune(c):
  t, p = c.tune, c.pacing
  for name in ("first_duration_warmups", "max_duration_warmups", "search_trials",
               "evals_per_warmup", "eval_batches"):
    _check(_is_int(t[name]) and t[name] >= 1, f"tune.{name}", t[name], "must be an integer >= 1")
  _check(t.max_duration_warmups >= t.first_duration_warmups, "tune.max_duration_warmups",
         t.max_duration_warmups, f"must be >= tune.first_duration_warmups="
         f"{t.first_duration_warmups}")
  for name in ("start_window_warmups", "window_warmups"):
    _check(isinstance(t[name], (int, float)) and 0 < t[name] <= 100, f"tune.{name}", t[name],
           "must be a number in (0, 100]")
  for name in ("start_window_warmups", "window_warmups"):  # A rise needs two points.
    _check(t[name] * t.evals_per_warmup >= 2, f"tune.{name}", t[name],
           f"must give at least 2 validation points with tune.evals_per_warmup="
           f"{t.evals_per_warmup} (window x evals_per_warmup >= 2)")
  _check(isinstance(t.rise_tolerance, (int, float)) and 0 < t.rise_tolerance < 10,
         "tune.rise_tolerance", t.rise_tolerance, "must be a number in (0, 10)")
  _check(isinstance(t.max_cost_fraction, (int, float)) and 0 < t.max_cost_fraction <= 1,
         "tune.max_cost_fraction", t.max_cost_fraction, "must be a number in (0, 1]")
  starts = t.seqlen_starts
  ok = isinstance(starts, (tuple, list)) and all(
      _is_int(s) and s % p.multiple == 0 and p.multiple <= s <= p.seqlen_end for s in starts)
  _check(ok and list(starts) == sorted(set(starts)), "tune.seqlen_starts", starts,
         f"must be ascending distinct multiples of pacing.multiple={p.multiple} in "
         f"[{p.multiple}, pacing.seqlen_end={p.seqlen_end}], or () for the default")


def _validate_optim(c):
  o = c.optim
  _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
  _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
  for name in ("warmup_steps", "warmup_tokens"):
    _check(_is_int(o[name]) and o[name] >= 0, f"optim.{name}", o[name], "must be an integer >= 0")
  _check(o.warmup_steps == 0 or o.warmup_tokens == 0, "optim.warmup_tokens", o.warmup_tokens,
         f"must be 0 when optim.warmup_steps={o.warmup_steps} is set (warm up by one unit)")
  _check(o.decay_tokens is None or o.decay_steps is None, "optim.decay_steps", o.decay_steps,
         f"must be unset when optim.decay_tokens={o.decay_tokens} is set (decay by one unit)")
  if o.decay_tokens is not None:
    _check(_is_int(o.decay_tokens) and o.decay_tokens > o.warmup_tokens, "optim.decay_tokens",
           o.decay_tokens, f"must be an integer > optim.warmup_tokens={o.warmup_tokens}")
  if o.decay_steps is not None:
    _check(_is_int(o.decay_steps) and o.decay_steps > o.warmup_steps, "optim.decay_steps",
           o.decay_steps, f"must be an integer > optim.warmup_steps={o.warmup_steps}")
  _check(0 <= o.b1 < 1, "optim.b1", o.b1, "must be in [0, 1)")
  _check(0 <= o.b2 < 1, "optim.b2", o.b2, "must be in [0, 1)")
  _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
  _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 turns clipping off)")
  _check(isinstance(o.z_loss, (int, float)) and math.isfinite(o.z_loss) and o.z_loss >= 0,
         "optim.z_loss", o.z_loss, "must be a number >= 0 (0 turns the z-loss off)")
  k = o.microbatches
  _check(k == "auto" or (_is_int(k) and k >= 1), "optim.microbatches", k,
         "must be an integer >= 1 or 'auto'")
  _check(k == "auto" or c.batch_size % k == 0, "optim.microbatches", k,
         f"must divide batch_size={c.batch_size}")


def _resolve_defaults(c: config_dict.ConfigDict):
  """Fills in the defaults that depend on other fields (in place, on a copy)."""
  if c.pacing.seqlen_end is None:
    c.pacing.seqlen_end = c.model.max_seqlen
  if c.model.scan_layers is None:
    c.model.scan_layers = c.model.n_layer >= SCAN_LAYERS_FROM
  _validate_cudnn_dropout(c.model)
  if c.data.dir is None and data_spec.corpus_missing(c.data) is None:
    c.data.dir = data_spec.default_data_dir(c.data)
  if c.eval.batch_size is None:
    c.eval.batch_size = c.batch_size
  if c.compile.threads is None:
    c.compile.threads = default_compile_threads()
  if c.compile.cache_dir is None:
    c.compile.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "slw_jax", "xla")
  if c.optim.decay_tokens is None and c.optim.decay_steps is None:
    if c.train_tokens is not None:
      c.optim.decay_tokens = c.train_tokens
    else:
      c.optim.decay_steps = c.train_steps


def validate(config: config_dict.ConfigDict) -> config_dict.FrozenConfigDict:
  """Checks every field; returns a frozen copy with dependent defaults filled in.

  Raises:
    ConfigError (a ValueError): the first bad field, its value and what is allowed.
  """
  c = config_dict.ConfigDict(config.to_dict(), type_safe=True)
  _validate_model(c.model)
  _validate_stop(c)
  _resolve_defaults(c)
  _validate_pacing(c.pacing, c.model)
  _validate_tune(c)
  _validate_batch_warmup(c)
  _validate_optim(c)
  data_spec.validate(c.data, c.model)
  _validate_log(c.log)
  _validate_runtime(c)
  pacing.check_warmup_fits_decay(c)
  if c.pacing.kind == "adaptive":
    pacing.check_deadline(c)
  return config_dict.FrozenConfigDict(c)


def with_overrides(config, overrides: dict) -> config_dict.FrozenConfigDict:
  """A validated copy of `config` with dotted-key overrides, e.g. {"model.remat": "block"}."""
  return validate(_override(config_dict.ConfigDict(config.to_dict()), overrides))


def _override(config, overrides: dict):
  for key, value in overrides.items():
    parent = config
    *parents, leaf = key.split(".")
    for name in parents:
      parent = parent[name]
    setattr(parent, leaf, value)
  return config


def load_config_file(path: str, overrides: dict | None = None) -> config_dict.ConfigDict:
  """Loads `get_config()` from a config file and applies dotted-key overrides (for tests/tools)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_slw_config", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"--config={path!r} is invalid: not a readable Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return _override(module.get_config(), overrides or {})

