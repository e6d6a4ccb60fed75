"""Where the benchmark scripts write their reports.

By default to ``benchmarks/out/``, which git ignores, so that a trial run never touches
the committed results; with ``--update-results`` to ``benchmarks/results/``, the figures
the README quotes; with ``--out DIR`` anywhere (the smoke tests use a temporary folder).

Example:
  >>> import argparse
  >>> from benchmarks import outputs
  >>> parser = argparse.ArgumentParser()
  >>> outputs.add_arguments(parser)
  >>> outputs.directory(parser.parse_args([])).name, outputs.directory(
  ...     parser.parse_args(['--update-results'])).name
  ('out', 'results')
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR, RESULTS_DIR = HERE / 'out', HERE / 'results'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds ``--update-results`` and ``--out DIR`` to ``parser``."""
  parser.add_argument('--update-results', action='store_true', help=f'write to {RESULTS_DIR}')
  parser.add_argument('--out', type=Path, help=f'write to this folder (default: {OUT_DIR})')


def directory(args: argparse.Namespace) -> Path:
  """The folder chosen by the arguments of :func:`add_arguments`."""
  return args.out or (RESULTS_DIR if args.update_results else OUT_DIR)
