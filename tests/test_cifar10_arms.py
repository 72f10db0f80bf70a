"""The results table and plot of benchmarks/cifar10_arms.py, on made-up finished runs (no training)."""
import json
from pathlib import Path

import pytest

from helpers import load_benchmark


@pytest.fixture(scope='module')
def arms():
    return load_benchmark('cifar10_arms')


def fake_run(out: Path, curve, train_loss=0.5, corruption_error=None):
    """A finished train_moex.py run folder: summary.csv with the test-error curve and results.json
    (with a corruption evaluation when ``corruption_error`` is given)."""
    out.mkdir(parents=True)
    lines = ['epoch,train_loss,eval_top1_err'] + [f'{i + 1},{train_loss},{err}' for i, err in enumerate(curve)]
    (out / 'summary.csv').write_text('\n'.join(lines) + '\n')
    best = min(range(len(curve)), key=curve.__getitem__)
    results = {'last': {'top1_err': curve[-1], 'top5_err': 1.0, 'loss': curve[-1] / 20, 'ece': curve[-1] / 10,
                        'train_loss': train_loss},
               'best': {'top1_err': curve[best], 'epoch': best + 1}}
    if corruption_error is not None:
        results['corruptions'] = {'clean_top1_err': curve[-1], 'mean_corruption_error': corruption_error}
    (out / 'results.json').write_text(json.dumps(results))
    return out


def test_reference_arm_is_the_counterpart_when_it_ran_else_the_first(arms):
    names = ['baseline', 'moex', 'cutmix', 'cutmix_moex']
    assert arms.reference_arm('baseline', names) is None
    assert arms.reference_arm('moex', names) == 'baseline'
    assert arms.reference_arm('cutmix', names) == 'baseline'
    assert arms.reference_arm('cutmix_moex', names) == 'cutmix'
    assert arms.reference_arm('cutmix_moex', ['baseline', 'cutmix_moex']) == 'baseline'
    assert arms.reference_arm('cutmix_moex_norm_in', ['cutmix', 'cutmix_moex', 'cutmix_moex_norm_in']) == 'cutmix'
    assert arms.reference_arm('bitempered_noise40', list(arms.ARM_SETS['label_noise'])) == 'ce_noise40'
    for arm, ref in arms.COUNTERPARTS.items():
        assert arm in arms.ARMS and ref in arms.ARMS
    # every CutMix + MoEx variant is judged against CutMix, not against the first arm
    assert all(arms.COUNTERPARTS.get(a) == 'cutmix' for a in arms.ARMS if a.startswith('cutmix_moex'))


def test_summarize_pairs_differences_by_seed(arms, tmp_path):
    # Seed 1's runs are both 2 points worse: the spread over seeds is large, the paired difference is not.
    finals = {('baseline', 0): 30.0, ('baseline', 1): 32.0, ('moex', 0): 29.5, ('moex', 1): 31.7,
              ('cutmix', 0): 31.0, ('cutmix', 1): 33.0, ('cutmix_moex', 0): 30.0}  # cutmix_moex seed 1 unfinished
    outs = {}
    for (arm, seed), final in finals.items():
        outs[(arm, seed)] = fake_run(tmp_path / f'{arm}-seed{seed}', [60.0, final - 1.0, final])
    outs[('cutmix_moex', 1)] = tmp_path / 'cutmix_moex-seed1'  # no results.json: left out
    names = ['baseline', 'moex', 'cutmix', 'cutmix_moex']
    table, curves = arms.summarize(names, arms.load_results(names, [0, 1], outs), outs)

    rows = {line.split(' | ')[0].lstrip('| '): line.split(' | ') for line in table[2:]}
    assert rows['baseline'][1:5] == ['2', '31.00 ± 1.41', '30.00 ± 1.41', '']
    assert rows['moex'][1:5] == ['2', '30.60 ± 1.56', '29.60 ± 1.56', '-0.40 ± 0.14 vs baseline']
    assert rows['cutmix'][4] == '+1.00 ± 0.00 vs baseline'
    assert rows['cutmix_moex'][1] == '1' and rows['cutmix_moex'][4] == '-1.00 ± 0.00 vs cutmix'
    assert rows['baseline'][6:8] == ['1.55 ± 0.07', '3.10 ± 0.14']  # test NLL and ECE, from results.json's 'last'
    assert len(table[0].split(' | ')) == len(rows['moex']) == len(table[1].split('|')) - 2
    assert curves['moex'] == [[60.0, 28.5, 29.5], [60.0, 30.7, 31.7]] and len(curves['cutmix_moex']) == 1


def test_summarize_adds_the_mean_corruption_error_and_its_paired_difference(arms, tmp_path):
    errors = {('baseline', 0): 50.0, ('baseline', 1): 54.0, ('mixstyle', 0): 47.0, ('mixstyle', 1): 52.0,
              ('dsu', 0): 51.0}  # dsu seed 1 ran without --eval-corruptions
    outs = {key: fake_run(tmp_path / f'{key[0]}-seed{key[1]}', [60.0, 30.0], corruption_error=error)
            for key, error in errors.items()}
    outs[('dsu', 1)] = fake_run(tmp_path / 'dsu-seed1', [60.0, 30.0])
    names = ['baseline', 'mixstyle', 'dsu']
    table, _ = arms.summarize(names, arms.load_results(names, [0, 1], outs), outs)

    cells = [[cell.strip() for cell in line[1:-1].split('|')] for line in table]
    assert cells[0][-2:] == ['mean corruption err (%)', 'its difference, paired by seed']
    rows = {row[0]: row for row in cells[2:]}
    assert rows['baseline'][-2:] == ['52.00 ± 2.83', '']
    assert rows['mixstyle'][-2:] == ['49.50 ± 3.54', '-2.50 ± 0.71 vs baseline']
    assert rows['dsu'][-2:] == ['51.00 ± 0.00', '+1.00 ± 0.00 vs baseline']
    assert len(cells[1]) == len(cells[0]) == len(rows['dsu'])


def test_corruption_table_has_a_row_per_corruption_and_a_column_per_arm(arms, tmp_path):
    def corrupted_run(name, fog, blur):
        out = fake_run(tmp_path / name, [60.0, 30.0], corruption_error=(fog + blur) / 2)
        results = json.loads((out / 'results.json').read_text())
        results['corruptions'].update(corruptions=['fog', 'blur'], mean_top1_err={'fog': fog, 'blur': blur})
        (out / 'results.json').write_text(json.dumps(results))
        return out

    outs = {('baseline', 0): corrupted_run('b0', 40.0, 50.0), ('baseline', 1): corrupted_run('b1', 44.0, 52.0),
            ('dsu', 0): corrupted_run('d0', 38.0, 47.0), ('dsu', 1): tmp_path / 'unfinished'}
    lines = arms.corruption_table(['baseline', 'dsu'], arms.load_results(['baseline', 'dsu'], [0, 1], outs))
    assert lines[0] == '| corruption | baseline | dsu |' and lines[1] == '|---|---|---|'
    assert lines[2:] == ['| fog | 42.00 | 38.00 |', '| blur | 51.00 | 47.00 |', '| mean | 46.50 | 42.50 |',
                         '| clean (same images) | 30.00 | 30.00 |', '| mean - clean | 16.50 | 12.50 |']
    plain = {('baseline', 0): fake_run(tmp_path / 'plain', [60.0, 30.0])}
    assert arms.corruption_table(['baseline'], arms.load_results(['baseline'], [0], plain)) == []


def test_plot_writes_a_png_and_leaves_no_temporary(arms, tmp_path):
    pytest.importorskip('matplotlib')
    path = tmp_path / 'test_error.png'
    arms.plot({'baseline': [[70.0, 40.0, 31.0, 30.0], [72.0, 41.0, 32.0, 30.5]], 'moex': [[75.0, 45.0, 33.0, 30.2]],
               'empty': []}, path, 'title')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['test_error.png']
