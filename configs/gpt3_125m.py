"""GPT-3 125M (125,226,240 parameters), the paper's aggressive 30B-token SLW recipe (Sec. 5.2).

Batch 2K x 2K, LR 40x GPT-3's (2.4e-2) warmed up over 375M tokens and cosine-decayed to 0 over
30B tokens, SLW linear from seqlen 72 over T = 11.5K steps (batch warmup off under SLW).
"""

from slw_jax import config_lib


def get_config():
  # No default corpus: pass data.source and data.vocab=gpt2:PATH (README: Real corpora).
  c = config_lib.no_corpus_config(config_lib.base_config())
  c.batch_size = 2048
  c.train_tokens = 30_000_000_000
  c.model.n_layer = 12
  c.model.d_model = 768
  c.model.n_head = 12
  c.model.vocab_size = 50257
  c.model.max_seqlen = 2048
  c.model.vocab_pad_multiple = 128  # 50304 rows: shards over any power-of-two mesh, fast matmuls.
  c.model.dtype = "bfloat16"  # bf16 compute, float32 parameters/optimizer (README: precision).
  c.optim.microbatches = "auto"  # The fewest that fit the device memory (checked before step 0).
  c.pacing.kind = "linear"
  c.pacing.seqlen_start = 72
  c.pacing.duration_steps = 11_500
  c.optim.lr = 2.4e-2
  c.optim.min_lr = 0.0
  c.optim.warmup_tokens = 375_000_000
  return c
