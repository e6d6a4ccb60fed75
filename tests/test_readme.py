"""Every Python snippet in README.md runs as written.

A fenced ``python`` block runs in a fresh interpreter. An HTML comment on the line
before it may say ``<!-- readme-test: devices=8 -->`` (simulate 8 CPU devices) or
``<!-- readme-test: skip (reason) -->``; a skip is reported with its reason.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
_BLOCK = re.compile(
  r'(?:<!--\s*readme-test:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```',
  re.DOTALL,
)


def _snippets():
  text = README.read_text(encoding='utf-8')
  for match in _BLOCK.finditer(text):
    line = text[: match.start()].count('\n') + 1
    yield pytest.param(match.group('directive') or '', match.group('code'), id=f'line{line}')


def test_readme_has_snippets():
  assert len(list(_snippets())) >= 2


@pytest.mark.parametrize('directive,code', list(_snippets()))
def test_readme_snippet_runs(directive, code, tmp_path):
  if directive.startswith('skip'):
    pytest.skip(f'README marks this snippet {directive}')
  env = dict(os.environ)
  devices = re.search(r'devices=(\d+)', directive)
  if devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices.group(1)}'
  env['JAX_PLATFORMS'] = 'cpu'
  script = tmp_path / 'snippet.py'
  script.write_text(code, encoding='utf-8')
  result = subprocess.run(
    [sys.executable, str(script)],
    cwd=README.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, f'snippet failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}'
