"""A step whose loss or gradient norm is not finite never reaches the optimizer.

Both values are already reduced over every rank that holds a part of them (the loss over dp x cp
and, under PP, from the last stage to all; the norm's squares over every shard), so every rank
reads the same two numbers and takes the same decision: one host sync per step, no extra collective
and none per microbatch. A NaN born in one rank's backward reaches the norm through the gradient
reduction.
"""
from __future__ import annotations

import math


class NonFiniteGuard:
    """``runtime.on_nonfinite``: ``skip`` drops the step on every rank (counted; ``max_skipped`` in a row
    stop the run), ``error`` stops at once. Either way the message names the step."""

    def __init__(self, mode: str, max_skipped: int, announce: bool = True):
        self.mode, self.max_skipped, self.announce = mode, max_skipped, announce
        self.skipped = 0  # over the run
        self.in_a_row = 0

    def skips(self, step: int, loss: float, grad_norm: float) -> bool:
        """Whether step ``step`` (1-based, as logged) must not update anything; raises where it must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
        if self.mode == "error":
            raise FloatingPointError(f"{what} is not finite (runtime.on_nonfinite=error); no rank applied it")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skipped:
            raise FloatingPointError(f"{what} is not finite, the {self.in_a_row}th step in a row "
                                     f"(runtime.max_skipped_steps={self.max_skipped}): stopping")
        if self.announce:
            print(f"WARNING: {what} is not finite: skipped on every rank ({self.skipped} so far)",
                  flush=True)
        return True
