"""GPT-3 125M (125,226,240 parameters), the paper's aggressive 30B-token SLW recipe (Sec. 5.2).

The paper reproduces the original GPT-3 recipe, then changes batch size, LR, decay length, the
LR floor and batch warmup for its 30B-token case. Sources cited per line: [paper] the SLW paper,
Sec. 5.2; [gpt3] Brown et al. 2020, Table 2.1 and Appendix B; [script] Megatron-DeepSpeed's GPT-3
pretraining example (`examples_deepspeed/data_efficiency/gpt/pretrain/
ds_pretrain_gpt_1.3B_dense_base_script.sh`, "GPT-3 Small 125M"); [megatron] Megatron-LM's
argument defaults, which that script leaves in force. Initialization: normal(0.02) ([script]
init_std=0.02 for 125M), output projections scaled by 1/sqrt(2 * n_layer), as models.py does.
"""

from slw_jax import config_lib, data_spec


def get_config():
  # No default corpus: pass data.source and data.vocab=gpt2:PATH (docs/data.md, "Real corpora").
  c = data_spec.no_corpus_config(config_lib.base_config())
  c.batch_size = 2048  # [paper] 8x GPT-3's 256 sequences (2K).
  c.train_tokens = 30_000_000_000  # [paper] 30B tokens, 10% of GPT-3's 300B.
  c.model.n_layer = 12  # [gpt3] Table 2.1, GPT-3 Small: 12 layers, d_model 768, 12 heads of 64.
  c.model.d_model = 768
  c.model.n_head = 12
  c.model.vocab_size = 50257  # [gpt3] GPT-2's BPE vocabulary ([script] gpt2-vocab.json).
  c.model.max_seqlen = 2048  # [gpt3] n_ctx = 2048.
  c.model.vocab_pad_multiple = 128  # 50304 rows: shards over any power-of-two mesh, fast matmuls.
  c.model.dtype = "bfloat16"  # [script] mixed precision (--fp16 there; bf16 needs no loss scale).
  c.model.dropout = 0.1  # [megatron] --hidden-dropout 0.1 (the script sets no dropout flag).
  c.model.attention_dropout = 0.1  # [megatron] --attention-dropout 0.1 (runs blockwise attention).
  c.optim.microbatches = "auto"  # The fewest that fit the device memory (checked before step 0).
  c.pacing.kind = "linear"  # [paper] linear pacing, lengths rounded down to 8 (Sec. 5.1).
  c.pacing.seqlen_start = 72  # [paper] seqlen_s = 72 "based on tuning"; batch warmup off.
  c.pacing.duration_steps = 11_500  # [paper] T = 11.5K steps.
  c.optim.lr = 2.4e-2  # [paper] 40x GPT-3's 6e-4, the highest stable LR with SLW.
  c.optim.min_lr = 0.0  # [paper] min LR reduced to 0 (GPT-3: 10% of the peak).
  c.optim.warmup_tokens = 375_000_000  # [gpt3] linear warmup over 375M tokens ([paper] kept).
  # Cosine decay ends at train_tokens (optim.decay_tokens unset): [paper] decay reduced to 30B.
  c.optim.b1 = 0.9  # [gpt3] Appendix B: Adam beta1 = 0.9 ([script] --adam-beta1 0.9),
  c.optim.b2 = 0.95  # [gpt3] beta2 = 0.95 ([script] --adam-beta2 0.95),
  c.optim.eps = 1e-8  # [gpt3] epsilon = 1e-8,
  c.optim.weight_decay = 0.1  # [gpt3] weight decay 0.1 ([script] --weight-decay 0.1),
  c.optim.clip_norm = 1.0  # [gpt3] global-norm clipping at 1.0 ([script] --clip-grad 1.0).
  return c
