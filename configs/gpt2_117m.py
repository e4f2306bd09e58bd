"""GPT-2 117M (124,439,808 parameters) with SLW, the paper's case 2 (Table 1).

Batch 512 x 1K, 157B tokens (300K baseline steps), Megatron-LM's LR recipe (1.5e-4, 3K warmup
steps, cosine to 1e-5 by tokens), SLW linear from seqlen 8 over T = 60K steps.
"""

from slw_jax import config_lib


def get_config():
  # No default corpus: pass data.source and data.vocab=gpt2:PATH (README: Real corpora).
  c = config_lib.no_corpus_config(config_lib.base_config())
  c.batch_size = 512
  c.train_tokens = 157_286_400_000  # 300K steps x 512 x 1024.
  c.model.n_layer = 12
  c.model.d_model = 768
  c.model.n_head = 12
  c.model.vocab_size = 50257
  c.model.max_seqlen = 1024
  c.model.vocab_pad_multiple = 128  # 50304 rows: shards over any power-of-two mesh, fast matmuls.
  c.model.dtype = "bfloat16"  # bf16 compute, float32 parameters/optimizer (README: precision).
  c.optim.microbatches = "auto"  # The fewest that fit the device memory (checked before step 0).
  c.pacing.kind = "linear"
  c.pacing.seqlen_start = 8
  c.pacing.duration_steps = 60_000
  c.optim.lr = 1.5e-4
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 3000
  return c
