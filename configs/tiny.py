"""Tiny GPT for CPU: trains the byte-level default corpus through a full SLW in minutes."""

from slw_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.batch_size = 16  # Sequences per step.
  c.train_tokens = 1_500_000  # Token budget (SLW steps are shorter, so it takes more steps).
  c.model.n_layer = 4
  c.model.d_model = 128
  c.model.n_head = 4
  c.model.vocab_size = 259  # seqio.ByteVocabulary: 256 bytes + pad, eos, unk.
  c.model.max_seqlen = 256
  c.pacing.kind = "linear"
  c.pacing.seqlen_start = 32  # At least pacing.multiple: lengths round down to a multiple.
  c.pacing.duration_steps = 150  # T: full length after 150 steps.
  c.pacing.multiple = 32  # 8 buckets instead of 31: on a CPU each bucket compiles for seconds.
  c.optim.lr = 2e-3
  c.optim.min_lr = 2e-4
  c.optim.warmup_steps = 30
  c.eval.every_steps = 100
  c.eval.batches = 8
  c.checkpoint.every_steps = 100
  c.log.print_every_steps = 25
  return c
