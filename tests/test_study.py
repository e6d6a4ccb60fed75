"""benchmarks/study.py: the pruning rule, and every phase end to end at tiny sizes."""

import json

import numpy as np

from benchmarks import registry, study, tasks


class _Task:
  def __init__(self, higher_is_better):
    self.higher_is_better = higher_is_better


def test_prune_keeps_baselines_reference_uncapped_and_the_best_grid_variants():
  grid = list(registry.GRID)
  # Validation metrics: on task 'up' (higher is better) grid[i] scores -i; on 'down' it scores i,
  # so grid[0] is best on both, then grid[1]... except the uncapped theory rule, best on 'up'.
  screen = {'up': {}, 'down': {}}
  for i, name in enumerate(grid):
    screen['up'][name] = {'metric': -float(i)}
    screen['down'][name] = {'metric': float(i)}
  screen['up']['f3eo_theory_uncapped_global']['metric'] = 100.0
  screen['down']['f3eo_theory_clip1_global']['metric'] = np.inf  # diverged: ranks last
  for name in ('f3eo_reference', *registry.BASELINES):
    screen['up'][name] = {'metric': 0.5}
    screen['down'][name] = {'metric': 0.5}
  preset = dict(study.PRESETS['full'], keep_top=3)
  kept, ranks, rule = study.prune(screen, {'up': _Task(True), 'down': _Task(False)}, preset)
  names = [study.entry_name(e) for e in kept]
  expected_top = [
    n for n in grid if n not in ('f3eo_theory_uncapped_global', 'f3eo_theory_clip1_global')
  ][:3]
  expected_theory = [n for n in grid if n.startswith('f3eo_theory_rho')][:2]
  assert set(names) == {
    *expected_top,
    *expected_theory,
    f'{expected_top[0]}+hvp_every=10',
    f'{expected_theory[0]}+hvp_every=10',
    'f3eo_reference',
    'f3eo_theory_uncapped_global',
    *registry.BASELINES,
  }
  assert ranks['f3eo_theory_clip1_global'] > ranks[expected_top[2]]
  assert 'mean rank' in rule


def test_study_smoke_runs_every_phase_and_resumes_from_its_cache(tmp_path):
  argv = ['--preset', 'smoke', '--out', str(tmp_path), '--no-progress']
  text = study.main(argv)
  payload = json.loads((tmp_path / 'study_smoke.json').read_text())
  preset = study.PRESETS['smoke']
  task_names = [tasks.get(n, **tasks.SMOKE_SIZES[n]).name for n in preset['tasks']]
  assert set(payload['screening']) == set(task_names)
  for by_variant in payload['screening'].values():
    assert set(by_variant) == set(preset['screen'])
    assert len(by_variant['adamw_wd']['records']) == 9  # lr × weight decay
  kept = payload['kept']
  assert {'f3eo_reference', *registry.BASELINES} <= set(kept)
  assert any(k.endswith('+hvp_every=10') for k in kept)
  for by_entry in payload['full'].values():
    assert set(by_entry) == set(kept)
    for res in by_entry.values():
      assert len(res['runs']) == preset['seeds']
      assert all(np.isfinite(r['final_metric']) for r in res['runs'])
  for wall in payload['wall_clock'].values():
    ref = wall['reference']
    assert wall['times'][ref]['ratio'] == 1.0
    for name, steps in wall['budgets'].items():
      assert steps == max(1, round(preset['steps'] / wall['times'][name]['ratio']))
      assert all(r['steps_done'] == steps for r in wall['runs'][name])
  for suffix in ('.md', '_curves.png', '_diagnostics.png', '_wall_clock.png'):
    assert (tmp_path / f'study_smoke{suffix}').stat().st_size > 0
  assert '## (d) Equal wall-clock' in text
  # Run again: every run and timing comes from the cache, the tables are the same.
  again = study.main(argv)
  payload2 = json.loads((tmp_path / 'study_smoke.json').read_text())
  assert payload2['machine']['cached_results_used'] > 0
  assert payload2['full_mean_ranks'] == payload['full_mean_ranks']
  assert again.split('## Tasks')[1] == text.split('## Tasks')[1]
