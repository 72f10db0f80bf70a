"""The results table and plot of benchmarks/cifar10_arms.py, on made-up finished runs (no training)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def arms():
    spec = importlib.util.spec_from_file_location('cifar10_arms', ROOT / 'benchmarks' / 'cifar10_arms.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(out: Path, curve, train_loss=0.5):
    """A finished train_moex.py run folder: summary.csv with the test-error curve and results.json."""
    out.mkdir(parents=True)
    lines = ['epoch,train_loss,eval_top1_err'] + [f'{i + 1},{train_loss},{err}' for i, err in enumerate(curve)]
    (out / 'summary.csv').write_text('\n'.join(lines) + '\n')
    best = min(range(len(curve)), key=curve.__getitem__)
    (out / 'results.json').write_text(json.dumps({
        'last': {'top1_err': curve[-1], 'top5_err': 1.0, 'loss': curve[-1] / 20, 'ece': curve[-1] / 10,
                 'train_loss': train_loss},
        'best': {'top1_err': curve[best], 'epoch': best + 1}}))
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
    table, curves = arms.summarize(['baseline', 'moex', 'cutmix', 'cutmix_moex'], [0, 1], outs)

    rows = {line.split(' | ')[0].lstrip('| '): line.split(' | ') for line in table[2:]}
    assert rows['baseline'][1:5] == ['2', '31.00 ± 1.41', '30.00 ± 1.41', '']
    assert rows['moex'][1:5] == ['2', '30.60 ± 1.56', '29.60 ± 1.56', '-0.40 ± 0.14 vs baseline']
    assert rows['cutmix'][4] == '+1.00 ± 0.00 vs baseline'
    assert rows['cutmix_moex'][1] == '1' and rows['cutmix_moex'][4] == '-1.00 ± 0.00 vs cutmix'
    assert rows['baseline'][6:8] == ['1.55 ± 0.07', '3.10 ± 0.14']  # test NLL and ECE, from results.json's 'last'
    assert len(table[0].split(' | ')) == len(rows['moex']) == len(table[1].split('|')) - 2
    assert curves['moex'] == [[60.0, 28.5, 29.5], [60.0, 30.7, 31.7]] and len(curves['cutmix_moex']) == 1


def test_plot_writes_a_png_and_leaves_no_temporary(arms, tmp_path):
    pytest.importorskip('matplotlib')
    path = tmp_path / 'test_error.png'
    arms.plot({'baseline': [[70.0, 40.0, 31.0, 30.0], [72.0, 41.0, 32.0, 30.5]], 'moex': [[75.0, 45.0, 33.0, 30.2]],
               'empty': []}, path, 'title')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['test_error.png']
