"""The study's plots, from the records only."""

from __future__ import annotations

import os

import sweep_analysis as analysis


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def lr_sweep(pts, arms, seed_lrs, out: str) -> str:
  """Final validation loss (min(final, init): a diverged run sits at its initial loss) against
  the learning rate, one curve per arm (seed 0), with the seed means and stds where run."""
  pyplot = _pyplot()
  figure, ax = pyplot.subplots(figsize=(8, 5))
  for arm in arms:
    sweep = analysis.at_seed0(pts, arm)
    lrs = sorted(sweep)
    line, = ax.plot(lrs, [sweep[lr].capped for lr in lrs], marker="o", label=arm, linewidth=1.2)
    bad = [lr for lr in lrs if not sweep[lr].stable]
    ax.scatter(bad, [sweep[lr].capped for lr in bad], marker="x", s=80, color=line.get_color())
    for lr in seed_lrs:
      mean, std, n = analysis.seed_summary(pts, arm, lr)
      if n > 1:
        ax.errorbar([lr * 1.03], [mean], yerr=[std or 0.0], color=line.get_color(), capsize=3)
  ax.set_xscale("log")
  _label(ax, "peak learning rate", "final validation loss (nats)",
         "LR sweep (x: diverged or ended near the initial loss; bars: seed mean ± std)")
  return _save(figure, pyplot, out, "lr_sweep.png")


def curves(records, lr: float, out: str, filename: str) -> str:
  """Validation loss against tokens, summed step time and FLOPs, and the training loss ratio,
  for every arm at one learning rate (seed 0)."""
  pyplot = _pyplot()
  runs = [(r.arm, r.run()) for r in records.values()
          if r.kind == "sweep" and r.lr == lr and r.seed == 0]
  figure, axes = pyplot.subplots(4, 1, figsize=(8, 13))
  panels = (("evals", "tokens", "val_loss", "tokens"), ("evals", "train_time_s", "val_loss",
                                                        "summed step time (s)"),
            ("evals", "flops", "val_loss", "training FLOPs"),
            ("steps", "step", "loss_ratio", "optimizer step"))
  for ax, (which, x, y, label) in zip(axes, panels):
    for arm, run in sorted(runs):
      rows = getattr(run, which)
      ax.plot([row[x] for row in rows], [row[y] for row in rows], label=arm, linewidth=1)
    ax.set_xlabel(label)
    ax.set_ylabel("loss ratio" if y == "loss_ratio" else "validation loss")
    ax.grid(alpha=0.3)
  axes[0].set_title(f"Equal cost at lr {lr:g} (seed 0)")
  _legend(axes[0])
  return _save(figure, pyplot, out, filename)


def mechanism(records, lr: float, out: str) -> str:
  """Gradient norm and max sqrt(nu) over the first steps at each fixed length, at `lr`."""
  pyplot = _pyplot()
  figure, axes = pyplot.subplots(2, 1, figsize=(8, 7))
  for record in analysis.probes(records, lr):
    s = record.steps
    label = f"seqlen {s['seqlen'][0]} x {s['batch_size'][0]} sequences"
    axes[0].plot(s["step"], s["grad_norm"], label=label)
    axes[1].plot(s["step"], s["adam_nu_max"], label=label)
  axes[0].set_ylabel("gradient norm (before clipping)")
  axes[1].set_ylabel("max sqrt(Adam nu)")
  for ax in axes:
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].set_title(f"The first steps at one length, equal tokens per step (lr {lr:g})")
  _legend(axes[0])
  return _save(figure, pyplot, out, "mechanism.png")


def adaptive_lengths(records, out: str) -> str:
  """The sequence length each step trained at: adaptive (its defaults) at every LR beside
  slw_tuned's and slw's fixed schedules (seed 0): where the closed loop held and where it grew."""
  pyplot = _pyplot()
  figure, ax = pyplot.subplots(figsize=(8, 5))
  sweep = [r for r in records.values() if r.kind == "sweep" and r.seed == 0]
  fixed = {}  # A fixed schedule is the same at any LR: its lowest LR's run.
  for r in sorted(sweep, key=lambda r: -r.lr):
    if r.arm in ("slw", "slw_tuned"):
      fixed[r.arm] = r
  runs = sorted([r for r in sweep if r.arm == "adaptive"], key=lambda r: r.lr)
  runs += [fixed[arm] for arm in sorted(fixed)]
  for record in runs:
    style = "-" if record.arm == "adaptive" else "--"
    label = f"adaptive, lr {record.lr:g}" if record.arm == "adaptive" else record.arm
    ax.plot(record.steps["step"], record.steps["seqlen"], style, label=label, linewidth=1)
  _label(ax, "optimizer step", "sequence length",
         "Adaptive pacing's lengths per LR (dashed: the fixed schedules, any LR)")
  return _save(figure, pyplot, out, "adaptive_lengths.png")


def _label(ax, x: str, y: str, title: str):
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  _legend(ax)


def _legend(ax):
  if ax.get_legend_handles_labels()[0]:  # A study with nothing to draw still gets its figure.
    ax.legend(fontsize=8)


def _save(figure, pyplot, out: str, filename: str) -> str:
  figure.tight_layout()
  figure.savefig(os.path.join(out, filename), dpi=90)
  pyplot.close(figure)
  return filename
