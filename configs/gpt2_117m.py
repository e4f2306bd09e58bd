"""GPT-2 117M (124,439,808 parameters) with SLW, the paper's case 2 (Table 1).

The paper replicates Megatron-LM's GPT-2 recipe (Sec. 3, "Training parameters"; the curriculum
example `examples/curriculum_learning/ds_pretrain_gpt2.sh` of Megatron-DeepSpeed runs it).
Sources cited per line: [paper] the SLW paper; [script] that example script; [megatron]
Megatron-LM's argument defaults, which the script leaves in force.
"""

from slw_jax import config_lib, data_spec


def get_config():
  # No default corpus: pass data.source and data.vocab=gpt2:PATH (docs/data.md, "Real corpora").
  c = data_spec.no_corpus_config(config_lib.base_config())
  c.batch_size = 512  # [paper] Sec. 3: batch size 512.
  c.train_tokens = 157_286_400_000  # [paper] 300K steps x 512 x 1024 = 157B tokens.
  c.model.n_layer = 12  # [script] 117M: 12 layers, 768 hidden, 12 heads.
  c.model.d_model = 768
  c.model.n_head = 12
  c.model.vocab_size = 50257  # [script] GPT-2 BPE vocabulary (gpt2-vocab.json, merges.txt).
  c.model.max_seqlen = 1024  # [paper] seqlen 1K, GPT-2's default.
  c.model.vocab_pad_multiple = 128  # 50304 rows: shards over any power-of-two mesh, fast matmuls.
  c.model.dtype = "bfloat16"  # [paper] mixed precision (FP16 there; bf16 needs no loss scale).
  c.model.dropout = 0.1  # [megatron] --hidden-dropout 0.1 (embeddings and residual branches).
  c.model.attention_dropout = 0.1  # [megatron] --attention-dropout 0.1 (runs blockwise attention).
  c.optim.microbatches = "auto"  # The fewest that fit the device memory (checked before step 0).
  c.pacing.kind = "linear"  # [paper] Sec. 4: linear pacing, lengths rounded down to 8.
  c.pacing.seqlen_start = 8  # [paper] Sec. 5.1: seqlen_s = 8 for 117M.
  c.pacing.duration_steps = 60_000  # [paper] Table 1 case 2: SLW 60K.
  c.optim.lr = 1.5e-4  # [paper] Sec. 3: LR 1.5e-4 ...
  c.optim.min_lr = 1e-5  # [paper] ... cosine decay to 1e-5 ...
  c.optim.warmup_steps = 3000  # [paper] ... after a 3K-step linear warmup; decay by tokens (Sec. 5).
  c.optim.b1 = 0.9  # [paper] Sec. 3: Adam beta1 = 0.9,
  c.optim.b2 = 0.999  # [paper] beta2 = 0.999,
  c.optim.eps = 1e-8  # [paper] epsilon = 1e-8,
  c.optim.weight_decay = 0.01  # [paper] 0.01 weight decay ([script] --weight-decay 1e-2),
  c.optim.clip_norm = 1.0  # [paper] gradient clipping at 1.0 ([script] --clip-grad 1.0).
  return c
