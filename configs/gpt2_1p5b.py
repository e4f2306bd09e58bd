"""GPT-2 1.5B (1,557,611,200 parameters) with SLW, the paper's case 8 (Table 1).

The same Megatron-LM GPT-2 recipe as `gpt2_117m.py` (which cites each value: batch 512 x 1K,
157B tokens, LR 1.5e-4 with 3K warmup steps and cosine to 1e-5 by tokens, Adam 0.9/0.999/1e-8,
weight decay 0.01, clipping 1.0, dropout 0.1 on residuals and attention), at 1.5B. Sources
cited per line: [paper] the SLW paper; [script] Megatron-DeepSpeed's
`examples/curriculum_learning/ds_pretrain_gpt2.sh`.
"""

import os

from slw_jax import config_lib


def get_config():
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "gpt2_117m.py"))
  c.model.n_layer = 48  # [script] 1558M: 48 layers, 1600 hidden, 25 heads.
  c.model.d_model = 1600
  c.model.n_head = 25
  c.model.remat = "block"  # [script] --checkpoint-activations: keep block inputs only.
  c.pacing.seqlen_start = 64  # [paper] Sec. 5.1: seqlen_s = 64 for 1.5B.
  c.pacing.duration_steps = 270_000  # [paper] Table 1 case 8: SLW 270K.
  return c
