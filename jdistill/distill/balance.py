"""Loss balance: how large each distillation term runs against the detection loss.

On real photos with small models trained from scratch, published weights can let a
distillation term swamp the detection loss (FRS's feature term ran at 8-15 against a detection
loss near 1.3). Two tools, both over a window of `distill.balance_steps` steps right after the
distillation warm-up:

- `Monitor` (host side, always on): averages each term's ratio to the detection loss over the
  logged steps of the window, logs them in one line when the window closes, and warns once per
  term staying above `WARN_RATIO`, suggesting the weight that would bring it to the target.
- `auto_balance` (device side, opt-in with `distill.auto_balance=True`): the step accumulates
  the same ratios in the training state and, at the window's last step, sets each term's scale
  to `distill.balance_target / mean ratio`, once. The scale lives in the state, so a resumed
  run keeps it and the rescale happens at the same step whatever the log interval.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

WARN_RATIO = 10.0
# Auto-balance never multiplies a term by more than this: a term near zero over the window
# (few positives, say) must not be blown up by orders of magnitude.
MAX_SCALE = 100.0
DEFAULT_STEPS = 50
DEFAULT_TARGET = 1.0


def window(config):
    """(first step, number of steps) of the balance window, steps counted from 0 as the state's
    `step` (the first step at full distillation weight is `warmup_steps`)."""
    distill = config.get("distill") or {}
    return int(distill.get("warmup_steps", 0)), int(distill.get("balance_steps", DEFAULT_STEPS))


def init_state(terms):
    """The auto-balance state: {'count': 0., 'ratio_sum': {key: 0.}, 'scale': {key: 1.}}
    float32 scalars (`count`: window steps taken; a non-finite step is not kept, so not
    counted)."""
    return {
        "count": jnp.float32(0.0),
        "ratio_sum": {t.key: jnp.float32(0.0) for t in terms},
        "scale": {t.key: jnp.float32(1.0) for t in terms},
    }


def update(state, step, contribs, detection, *, start, steps, target):
    """One step of auto-balancing (inside jit).

    Args:
      state: from `init_state`.
      step: int32 scalar, the step just taken (0-based).
      contribs: {key: weighted term at the current scale} float32 scalars.
      detection: the detection loss, float32 scalar.
      start, steps: the window (`window`).
      target: the ratio each term is rescaled to.
    Returns:
      the new state; the scales change only at step start + steps - 1, to target / mean ratio,
      at most `MAX_SCALE`.
    """
    inside = (step >= start) & (step < start + steps)
    last = step == start + steps - 1
    count = state["count"] + inside.astype(jnp.float32)
    ratio_sum, scale = {}, {}
    for key, contrib in contribs.items():
        old = state["scale"][key]
        ratio = jax.lax.stop_gradient(contrib / old) / jnp.maximum(detection, 1e-12)
        total = state["ratio_sum"][key] + jnp.where(inside, ratio, 0.0)
        mean = total / jnp.maximum(count, 1.0)
        new = jnp.minimum(target / jnp.where(mean > 0, mean, 1.0), MAX_SCALE)
        ratio_sum[key] = total
        scale[key] = jnp.where(last & (mean > 0), new, old)
    return {"count": count, "ratio_sum": ratio_sum, "scale": scale}


class Monitor:
    """Host-side report of the balance window from the logged per-step metrics."""

    def __init__(self, config, terms):
        self.start, self.steps = window(config)
        self.weights = {t.key: float(t.cfg.weight) for t in terms}
        distill = config.get("distill") or {}
        self.target = float(distill.get("balance_target", DEFAULT_TARGET))
        self.auto = bool(distill.get("auto_balance", False))
        self.ratios = {k: [] for k in self.weights}
        self.done = not terms or self.steps <= 0

    def observe(self, steps, rows):
        """Takes logged steps (1-based, as the log counts) and their metric rows; reports once
        the window's last step has been seen. Returns {key: mean ratio} then, else None."""
        if self.done:
            return None
        for step, row in zip(steps, rows, strict=True):
            # Log step s is state step s - 1.
            if self.start < step <= self.start + self.steps:
                det = max(float(row["student/loss"]), 1e-12)
                for key in self.ratios:
                    # at scale 1 the contribution is weight x term; under auto-balance the
                    # scale is 1 throughout the window too (it changes at its last step)
                    self.ratios[key].append(float(row[f"distill/{key}"]) / det)
        if not steps or steps[-1] < self.start + self.steps:
            return None
        self.done = True
        if not any(self.ratios.values()):  # resumed after the window: nothing to report
            return None
        means = {k: float(np.mean(v)) if v else float("nan") for k, v in self.ratios.items()}
        first, last = self.start + 1, self.start + self.steps
        logging.info(
            "loss balance over steps %d-%d (after warm-up), each term / detection loss: %s",
            first,
            last,
            ", ".join(f"{k} {v:.3g}x" for k, v in means.items()),
        )
        for key, ratio in means.items():
            if ratio > WARN_RATIO and not self.auto:
                logging.warning(
                    "distillation term %r stays %.1fx the detection loss over steps %d-%d "
                    "(> %gx): weight %.4g would bring it to %gx (current weight %g), or set "
                    "distill.auto_balance=True",
                    key,
                    ratio,
                    first,
                    last,
                    WARN_RATIO,
                    self.weights[key] * self.target / ratio,
                    self.target,
                    self.weights[key],
                )
        return means
