"""Side-by-side timing: interleaved rounds and paired ratios.

Every variant is set up (compiled, warmed up) first. Then each round runs one block of
steps of every variant, in an order rotated by one each round, so that a machine whose
load drifts slows every variant alike. A ratio between two variants is the median of
the per-round ratios of their blocks, taken side by side.

Example:
  >>> from benchmarks import timing
  >>> times = timing.interleaved({'a': lambda: 2.0, 'b': lambda: 1.0}, rounds=3)
  >>> times['a'], timing.paired_ratio(times['a'], times['b'])
  ([2.0, 2.0, 2.0], 2.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def interleaved(
  blocks: Mapping[str, Callable[[], float]],
  rounds: int,
  *,
  on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
  """Runs ``rounds`` rounds of every block, in rotating order.

  Args:
    blocks: name -> a function that runs one block and returns its time (any unit,
      usually seconds per step).
    rounds: the number of rounds.
    on_round: called after each round with its index and the times so far.

  Returns:
    name -> the block's time in every round, in round order.
  """
  names = list(blocks)
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(rounds):
    shift = i % len(names) if names else 0
    for name in names[shift:] + names[:shift]:
      times[name].append(float(blocks[name]()))
    if on_round is not None:
      on_round(i, times)
  return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
  """The median over rounds of ``numerator[i] / denominator[i]``."""
  return float(np.median(np.asarray(numerator, float) / np.asarray(denominator, float)))
