"""benchmarks/study.py: the pruning rule, and both phases end to end at tiny sizes."""

import json

import numpy as np
import pytest

from benchmarks import config, study


class _Task:
  def __init__(self, higher_is_better):
    self.higher_is_better = higher_is_better


def test_prune_keeps_baselines_reference_uncapped_and_the_best_grid_variants():
  grid = list(config.GRID)
  # grid[i] scores -i on 'up' (higher is better) and i on 'down': grid[0] is best on both,
  # except that the uncapped theory rule is best on 'up' and theory clip1 diverged on 'down'.
  screen = {'up': {n: {'metric': -float(i)} for i, n in enumerate(grid)}}
  screen['down'] = {n: {'metric': float(i)} for i, n in enumerate(grid)}
  screen['up']['f3eo_theory_uncapped_global']['metric'] = 100.0
  screen['down']['f3eo_theory_clip1_global']['metric'] = np.inf
  for name in ('f3eo_reference', *config.BASELINES):
    screen['up'][name] = screen['down'][name] = {'metric': 0.5}
  preset = dict(study.PRESETS['full'], keep_top=3)
  kept, ranks = study.prune(screen, {'up': _Task(True), 'down': _Task(False)}, preset)
  skip = ('f3eo_theory_uncapped_global', 'f3eo_theory_clip1_global')
  top = [n for n in grid if n not in skip][:3]
  theory = [n for n in grid if n.startswith('f3eo_theory_rho')][:2]
  every = {f'{top[0]}+hvp_every=10', f'{theory[0]}+hvp_every=10'}
  assert {v.name for v in kept} == {*top, *theory, *every, *study.ALWAYS_KEPT}
  assert ranks['f3eo_theory_clip1_global'] > ranks[top[2]]


def test_study_smoke_runs_both_phases_and_resumes_from_its_cache(tmp_path):
  argv = ['--preset', 'smoke', '--out', str(tmp_path), '--phase', 'selection']
  text = study.main(argv)
  payload = json.loads((tmp_path / 'study_smoke.json').read_text())
  preset = study.PRESETS['smoke']
  assert set(payload['screening']) == set(preset['selection'])
  for by_variant in payload['screening'].values():
    assert set(by_variant) == set(preset['screen'])
    assert len(by_variant['adamw_wd']['records']) == 9  # lr × weight decay
  assert {'f3eo_reference', 'adamw', 'adamw_wd'} <= set(payload['kept'])
  assert any(k.endswith('+hvp_every=10') for k in payload['kept'])
  for by_entry in payload['full'].values():
    assert set(by_entry) == set(payload['kept'])
    assert all(len(res['runs']) == preset['seeds'] for res in by_entry.values())
  for wall in payload['wall_clock'].values():
    for w in wall.values():
      assert w['steps'] == max(1, round(preset['steps'] / w['ratio']))
      assert all(r['steps_done'] == w['steps'] for r in w['runs'])
  assert '## (d) Equal wall-clock' in text
  again = study.main(argv)  # every run and timing from the cache: the same tables
  assert (
    json.loads((tmp_path / 'study_smoke.json').read_text())['machine']['cached_results_used'] > 0
  )
  assert again.split('## (a)')[1] == text.split('## (a)')[1]

  text = study.main(['--preset', 'smoke', '--out', str(tmp_path), '--phase', 'evaluation'])
  payload = json.loads((tmp_path / 'study_smoke_evaluation.json').read_text())
  for by_name in payload['evaluation'].values():
    assert set(by_name) == set(study.EVALUATED)
    seeds = [[r['config']['seed'] for r in res['runs']] for res in by_name.values()]
    assert seeds == [list(preset['evaluation_seeds'])] * 4
  for wall in payload['evaluation_wall_clock'].values():
    assert wall['f3eo']['ratio'] == 1.0 and set(wall) == set(study.EVALUATED)
  assert '## Evaluation: equal steps' in text and '## Evaluation: equal wall-clock' in text


@pytest.mark.parametrize('name', ['study_full.json'])
def test_the_committed_selection_record_is_kept(name):
  path = study.report.RESULTS_DIR / name
  payload = json.loads(path.read_text())
  assert {'screening', 'kept', 'full', 'wall_clock'} <= set(payload)
