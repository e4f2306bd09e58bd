"""GPT-2 conversion at the real 124M size: import and export time, peak memory, logit error.

  .venv/bin/python benchmarks/convert_gpt2.py [--config=configs/gpt2_117m.py] [--seqlen=1024]

A transformers GPT-2 with GPT-2 small's shape and random weights (nothing is downloaded) is
saved with `save_pretrained`, imported into a slw_jax checkpoint, compared with transformers'
logits on one full-length sequence, and exported back; the export must load into transformers
with identical tensors. Prints one JSON line.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from slw_jax import checkpoint, config_lib, convert  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/gpt2_117m.py")
  parser.add_argument("--seqlen", type=int, default=1024)
  parser.add_argument("--vocab_pad_multiple", type=int, default=128)
  args = parser.parse_args()
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 small's shape.
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.02 * torch.randn_like(param))
  root = tempfile.mkdtemp()
  hf_dir, run, out = (os.path.join(root, n) for n in ("hf", "run", "out"))
  model.save_pretrained(hf_dir)

  start = time.perf_counter()
  c = config_lib.load_config_file(args.config,
                                  {"model.vocab_pad_multiple": args.vocab_pad_multiple})
  convert.take_model_shape(c, convert.read_hf_config(hf_dir), log=lambda _: None)
  convert.import_hf(hf_dir, run, config_lib.validate(c), log=lambda _: None)
  import_s = time.perf_counter() - start

  tokens = np.random.default_rng(0).integers(0, 50257, (1, args.seqlen))
  loaded = checkpoint.load_params(run)
  ours = np.asarray(nnx.merge(loaded.graphdef, loaded.params)(tokens.astype(np.int32)))
  with torch.no_grad():
    reference = model(torch.as_tensor(tokens)).logits.numpy()
  error = float(np.abs(ours - reference).max() / np.abs(reference).max())
  same_argmax = float((ours.argmax(-1) == reference.argmax(-1)).mean())

  start = time.perf_counter()
  convert.export_hf(run, None, out, log=lambda _: None)
  export_s = time.perf_counter() - start
  back = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
  identical = all(torch.equal(v, back[k]) for k, v in model.state_dict().items())
  print(json.dumps({
      "params": sum(p.numel() for p in model.parameters()), "import_s": round(import_s, 2),
      "export_s": round(export_s, 2), "logits_relative_error": error,
      "argmax_agreement": same_argmax, "export_identical": identical,
      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":
  main()
