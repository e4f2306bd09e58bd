"""A self-contained PyTorch GPT-2 training step: the peer our JAX step is timed against.

What: a GPT-2 117M-class decoder and its training step written here in plain PyTorch, the way a
fast PyTorch user writes one (nanoGPT's `model.py`, llm.c's `train_gpt2.py`): learned token and
position embeddings, pre-LayerNorm blocks, a fused qkv projection into
`F.scaled_dot_product_attention(is_causal=True)` (the flash kernel on CUDA), a 4x tanh-GELU MLP,
an output head tied to the token embedding over a vocabulary padded to a multiple (padded logits
are sliced off before the loss), GPT-2 init; bf16 autocast, float32 cross-entropy, gradient
clipping at 1.0, fused AdamW, TF32 matmuls and `torch.compile` on CUDA. No `transformers`, no
downloads.

Why: a speed number for our JAX step means little alone. Its ratio to this step on the same
shapes, device and run does. benchmarks/gpu_ab.py runs this file as a subprocess, so the two
frameworks never share GPU memory, and reads the one JSON line it prints. The model FLOP count
uses the formula of our JAX side (`slw_jax.models.train_flops_per_token`) and the parameter
count equals `slw_jax.models.num_params` for the same shapes, so the two lines compare directly.

Commands:
  python benchmarks/torch_peer.py --n_layer 12 --d_model 768 --n_head 12 --vocab_size 50257 \\
      --max_seqlen 1024 --rows 64 --seqlen 1024 --steps 5 [--device cuda|cpu] [--out FILE.json]
  python benchmarks/torch_peer.py --help
Stdout: one JSON line (the result of `measure`); logs go to stderr. Exit status 0 on success,
1 with an "error" field in the JSON line on any failure (out of memory included), 2 on a bad
flag (one line on stderr, before any model is built).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon.


def _setting(default, help_text: str):
  """A PeerConfig field whose help text the CLI shows."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  """Model shapes and step settings; the CLI flags by the same names set them."""
  n_layer: int = _setting(12, "Transformer blocks.")
  d_model: int = _setting(768, "Residual stream width.")
  n_head: int = _setting(12, "Attention heads (must divide d_model).")
  vocab_size: int = _setting(50257, "Real vocabulary; logits past it never score.")
  max_seqlen: int = _setting(1024, "Rows of the position embedding.")
  vocab_pad_multiple: int = _setting(128, "Embedding rows padded to a multiple (50257 -> 50304).")
  rows: int = _setting(8, "Sequences per step.")
  seqlen: int = _setting(1024, "Tokens per sequence (<= max_seqlen).")
  steps: int = _setting(5, "Timed steps.")
  warmup: int = _setting(2, "Untimed steps first (compilation happens there).")
  lr: float = _setting(1e-4, "AdamW learning rate (constant).")
  dropout: float = _setting(0.0, "Embedding and residual dropout.")
  attention_dropout: float = _setting(0.0, "Dropout on the attention probabilities.")
  device: str | None = _setting(None, "cuda | cpu; None: cuda if available, else cpu.")
  dtype: str | None = _setting(None, "Autocast dtype, float32 | bfloat16; None: bfloat16 on "
                               "CUDA, float32 elsewhere.")
  compile: bool = _setting(True, "torch.compile(model).")
  seed: int = _setting(0, "Seeds the init, the tokens and dropout.")

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head


class SettingsError(ValueError):
  """A setting outside what is allowed; the message names the value and the allowed range."""


def check_settings(cfg: PeerConfig) -> None:
  """Raises SettingsError for the first bad setting (before anything is built)."""
  positive = ("n_layer", "d_model", "n_head", "vocab_size", "max_seqlen", "vocab_pad_multiple",
              "rows", "seqlen", "steps")
  for name in positive:
    if getattr(cfg, name) < 1:
      raise SettingsError(f"--{name}={getattr(cfg, name)} is invalid: must be >= 1")
  if cfg.warmup < 0:
    raise SettingsError(f"--warmup={cfg.warmup} is invalid: must be >= 0")
  if cfg.seqlen > cfg.max_seqlen:
    raise SettingsError(f"--seqlen={cfg.seqlen} is invalid: must be <= --max_seqlen="
                        f"{cfg.max_seqlen}")
  if cfg.d_model % cfg.n_head:
    raise SettingsError(f"--n_head={cfg.n_head} is invalid: must divide --d_model="
                        f"{cfg.d_model}")
  for name in ("dropout", "attention_dropout"):
    if not 0.0 <= getattr(cfg, name) < 1.0:
      raise SettingsError(f"--{name}={getattr(cfg, name)} is invalid: must be in [0, 1)")
  if not cfg.lr > 0:
    raise SettingsError(f"--lr={cfg.lr} is invalid: must be > 0")
  if cfg.device not in (None, "cuda", "cpu"):
    raise SettingsError(f"--device={cfg.device} is invalid: must be cuda or cpu")
  if cfg.device == "cuda" and not torch.cuda.is_available():
    raise SettingsError("--device=cuda is invalid here: torch.cuda.is_available() is False "
                        f"(torch {torch.__version__}); use --device cpu")
  if cfg.dtype not in (None, "float32", "bfloat16"):
    raise SettingsError(f"--dtype={cfg.dtype} is invalid: must be float32 or bfloat16")


# ----- model ------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
  """Fused qkv projection, causal SDPA, output projection, residual dropout."""

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    self.n_head = cfg.n_head
    self.attention_dropout = cfg.attention_dropout
    self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=True)
    self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
    self.proj.residual_projection = True  # Scaled down at init (GPT-2).
    self.resid_drop = nn.Dropout(cfg.dropout)

  def forward(self, x_bld):
    batch, seqlen, width = x_bld.shape
    q_bld, k_bld, v_bld = self.qkv(x_bld).split(width, dim=2)
    heads = (batch, seqlen, self.n_head, width // self.n_head)
    q_bhlk, k_bhlk, v_bhlk = (t.view(heads).transpose(1, 2) for t in (q_bld, k_bld, v_bld))
    y_bhlk = F.scaled_dot_product_attention(
        q_bhlk, k_bhlk, v_bhlk, is_causal=True,
        dropout_p=self.attention_dropout if self.training else 0.0)
    y_bld = y_bhlk.transpose(1, 2).contiguous().view(batch, seqlen, width)
    return self.resid_drop(self.proj(y_bld))


class MLP(nn.Module):
  """d -> 4d -> d with tanh GELU (GPT-2's approximation)."""

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=True)
    self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=True)
    self.proj.residual_projection = True
    self.drop = nn.Dropout(cfg.dropout)

  def forward(self, x_bld):
    return self.drop(self.proj(F.gelu(self.fc(x_bld), approximate="tanh")))


class Block(nn.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    self.ln_1 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
    self.attn = CausalSelfAttention(cfg)
    self.ln_2 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
    self.mlp = MLP(cfg)

  def forward(self, x_bld):
    x_bld = x_bld + self.attn(self.ln_1(x_bld))
    return x_bld + self.mlp(self.ln_2(x_bld))


class GPT(nn.Module):
  """Tokens [B, L] and targets [B, L] -> mean float32 cross-entropy."""

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    self.vocab_size = cfg.vocab_size
    self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model)
    self.wpe = nn.Embedding(cfg.max_seqlen, cfg.d_model)
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
    self.ln_f = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for module in self.modules():
      if isinstance(module, nn.Linear):
        std = residual_std if getattr(module, "residual_projection", False) else 0.02
        nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(module.bias)
      elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)

  def forward(self, tokens_bl, targets_bl):
    positions_l = torch.arange(tokens_bl.shape[1], device=tokens_bl.device)
    x_bld = self.drop(self.wte(tokens_bl) + self.wpe(positions_l))
    for block in self.blocks:
      x_bld = block(x_bld)
    # The head is the token embedding itself (tied): one parameter, counted once. It runs over
    # the padded vocabulary (an aligned matmul, as our JAX side does); the padded columns are
    # sliced off before the loss so they never take probability mass.
    logits_blv = F.linear(self.ln_f(x_bld), self.wte.weight)[..., :self.vocab_size]
    return F.cross_entropy(logits_blv.float().reshape(-1, self.vocab_size),
                           targets_bl.reshape(-1))


def num_params(model: nn.Module) -> int:
  """Parameters counted once each (the tied head is the token embedding): what
  `slw_jax.models.num_params` counts for the same shapes."""
  return sum(p.numel() for p in model.parameters())


def train_flops_per_token(cfg: PeerConfig, n_params: int) -> float:
  """Our JAX side's formula (`slw_jax.models.train_flops_per_token`): 6N over the matmul
  parameters (all but the position embedding) plus 12 * n_layer * d_model * seqlen for
  attention, with no discount for the causal mask."""
  return (6.0 * (n_params - cfg.max_seqlen * cfg.d_model)
          + 12.0 * cfg.n_layer * cfg.d_model * cfg.seqlen)


# ----- step -------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, cfg: PeerConfig, device: str) -> torch.optim.AdamW:
  """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorms)."""
  params = list(model.parameters())
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  # fused=True is the fast CUDA path; on the CPU torch's default (foreach) is what users get.
  fused = {"fused": True} if device == "cuda" else {}
  return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, **fused)


def attention_backend(cfg: PeerConfig, device: str, dtype: str) -> str:
  """flash on CUDA where the kernel takes these shapes, else default (torch picks).

  PyTorch's flash kernel applies dropout_p itself, so attention dropout does not rule it out;
  float32 and head dims past 256 or not a multiple of 8 do (forcing it there would fail).
  """
  if device == "cuda" and dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 256:
    return "flash"
  return "default"


def step_contexts(device: str, dtype: str, backend: str) -> contextlib.ExitStack:
  """The contexts a step's forward and backward run under: autocast and the SDPA backend."""
  stack = contextlib.ExitStack()
  if dtype == "bfloat16":
    stack.enter_context(torch.autocast(device_type=device, dtype=torch.bfloat16))
  if backend == "flash":
    # Imported here: torch.nn.attention is new in torch 2.3, and only this path needs it.
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=g-import-not-at-top
    stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
  return stack


def make_step(model, optimizer, device: str, dtype: str, backend: str):
  """step(tokens_bl, targets_bl) -> the loss (a detached device scalar), after one update."""
  params = list(model.parameters())

  def step(tokens_bl, targets_bl):
    with step_contexts(device, dtype, backend):
      loss = model(tokens_bl, targets_bl)
      loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  return step


def synchronize(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def resolve(cfg: PeerConfig) -> tuple[str, str]:
  """(device, dtype) with their defaults filled in."""
  device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
  dtype = cfg.dtype or ("bfloat16" if device == "cuda" else "float32")
  return device, dtype


def device_name(device: str) -> str:
  """The GPU's name, or the CPU's model name where Linux says it."""
  if device == "cuda":
    return torch.cuda.get_device_name()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    models = []
  return models[0] if models else (platform.processor() or platform.machine() or "cpu")


def run_steps(cfg: PeerConfig, result: dict) -> None:
  """Builds the model, runs the warmup and timed steps, and fills `result` as it goes (so a
  failure leaves what was measured before it)."""
  device, dtype = result["device"], result["dtype"]
  if device == "cuda":
    # TF32 for float32 matmuls left outside autocast, as llm.c's train_gpt2.py allows.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.cuda.reset_peak_memory_stats()
  torch.manual_seed(cfg.seed)
  model = GPT(cfg).to(device).train()
  result["n_params"] = num_params(model)
  flops_per_token = train_flops_per_token(cfg, result["n_params"])
  result["flops_per_token"] = flops_per_token
  optimizer = make_optimizer(model, cfg, device)
  compiled = torch.compile(model) if cfg.compile else model
  step = make_step(compiled, optimizer, device, dtype, result["attention_backend"])
  generator = torch.Generator().manual_seed(cfg.seed)
  tokens = torch.randint(0, cfg.vocab_size, (cfg.rows, cfg.seqlen + 1), generator=generator)
  tokens = tokens.to(device)
  inputs_bl, targets_bl = tokens[:, :-1], tokens[:, 1:]

  losses, step_seconds = [], []
  start = time.perf_counter()
  for _ in range(cfg.warmup):
    losses.append(step(inputs_bl, targets_bl))
  synchronize(device)
  result["warmup_s"] = time.perf_counter() - start
  print(f"torch_peer: {cfg.warmup} warmup step(s) in {result['warmup_s']:.1f}s", file=sys.stderr)
  for _ in range(cfg.steps):
    start = time.perf_counter()
    losses.append(step(inputs_bl, targets_bl))
    synchronize(device)
    step_seconds.append(time.perf_counter() - start)
  record_timings(cfg, result, [float(loss) for loss in losses], step_seconds, flops_per_token)


def record_timings(cfg: PeerConfig, result: dict, losses: list[float], step_seconds: list[float],
                   flops_per_token: float) -> None:
  """Fills the losses, step times and rates into `result`; a non-finite loss is an error."""
  tokens_per_step = cfg.rows * cfg.seqlen
  median = statistics.median(step_seconds)
  result.update(
      losses=losses, losses_finite=all(math.isfinite(x) for x in losses),
      step_s=step_seconds, step_s_median=median, step_s_min=min(step_seconds),
      tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_step / median,
      model_flops_per_s=flops_per_token * tokens_per_step / median)
  if result["device"] == "cuda":
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  if not result["losses_finite"]:
    first = next(i for i, x in enumerate(losses) if not math.isfinite(x))
    result["error"] = f"non-finite loss {losses[first]} at step {first} (warmup included)"


def measure(**settings) -> dict:
  """One peer measurement; `settings` are PeerConfig's fields (the CLI flags), others default.

  Raises SettingsError for a bad or unknown setting. Any failure while running (out of memory
  included) comes back as the result's "error" field (one line), with what was measured before.

  Returns:
    A JSON-ready dict: settings, torch_version, device, device_name, dtype, compile,
    attention_backend, n_params, flops_per_token, warmup_s, losses (warmup steps first),
    losses_finite, step_s, step_s_median, step_s_min, tokens_per_step, tokens_per_s and
    model_flops_per_s (both at the median step), peak_memory_bytes (None off CUDA), and
    "error" only on failure.
  """
  known = {f.name for f in dataclasses.fields(PeerConfig)}
  unknown = sorted(set(settings) - known)
  if unknown:
    raise SettingsError(f"unknown setting(s) {unknown}: allowed are {sorted(known)}")
  cfg = PeerConfig(**settings)
  check_settings(cfg)
  device, dtype = resolve(cfg)
  result = {"settings": dataclasses.asdict(cfg), "torch_version": torch.__version__,
            "device": device, "device_name": device_name(device), "dtype": dtype,
            "compile": cfg.compile, "attention_backend": attention_backend(cfg, device, dtype),
            "peak_memory_bytes": None}
  try:
    run_steps(cfg, result)
  except Exception as e:  # pylint: disable=broad-except
    # The caller records the failure and goes on: the message on one line, the traceback to
    # stderr for whoever reads the log.
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc(file=sys.stderr)
    message = " ".join(str(e).split()) or repr(e)
    result["error"] = f"{type(e).__name__}: {message[:500]}"
    if device == "cuda":
      result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  return result


# ----- CLI --------------------------------------------------------------------------------------

def parse_args(argv=None) -> tuple[dict, str | None]:
  """(settings for `measure`, the --out path or None)."""
  parser = argparse.ArgumentParser(
      description="Time a plain-PyTorch GPT-2 training step; print one JSON line.")
  for field in dataclasses.fields(PeerConfig):
    if field.name in ("compile", "device", "dtype"):
      continue
    parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default,
                        help=f"{field.metadata['help']} Default {field.default}.")
  parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                      help=PeerConfig.__dataclass_fields__["device"].metadata["help"])
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help=PeerConfig.__dataclass_fields__["dtype"].metadata["help"])
  parser.add_argument("--compile", dest="compile", action="store_true", default=True,
                      help="torch.compile the model (the default).")
  parser.add_argument("--no_compile", dest="compile", action="store_false",
                      help="Run the model eagerly.")
  parser.add_argument("--out", default=None, help="Also write the JSON result to this file.")
  args = vars(parser.parse_args(argv))
  return args, args.pop("out")


def main(argv=None) -> int:
  """The CLI; returns the exit status (0 ok, 1 failure in the run, 2 bad flag)."""
  settings, out = parse_args(argv)
  try:
    check_settings(PeerConfig(**settings))
  except SettingsError as e:
    print(f"torch_peer: {e}", file=sys.stderr)
    return 2
  result = measure(**settings)
  line = json.dumps(result)
  print(line, flush=True)
  if out:
    with open(out, "w", encoding="utf-8") as f:
      f.write(line + "\n")
  return 1 if "error" in result else 0


if __name__ == "__main__":
  sys.exit(main())
