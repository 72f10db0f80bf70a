"""benchmarks/bench_pyramidnet_step.py: its rewrite of the authors' step computes the MoEx of the task, and it
runs and prints its table on the CPU with a small PyramidNet (no figures are checked)."""
import re

import pytest
import timm
import torch

from helpers import load_benchmark
from timm_moex import get_moex_hook


@pytest.fixture(scope='module')
def bench():
    return load_benchmark('bench_pyramidnet_step')


def test_authors_forward_is_the_moex_of_the_task_with_the_same_weights(bench):
    """Their stem run again on the shuffled batch gives the same moments as permuting the stem output (the batch
    statistics of BN are the same over a permuted batch), so the two models' outputs agree, with MoEx and without."""
    torch.manual_seed(0)
    ours = timm.create_model('pyramidnet110_a48_moex', num_classes=10).train()
    net = timm.create_model('pyramidnet110_a48', num_classes=10)
    net.load_state_dict(ours.state_dict())
    theirs = bench.AuthorsPyramidNet(net).train()
    x = torch.randn(6, 3, 32, 32)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    get_moex_hook(ours).arm(perm)
    torch.testing.assert_close(theirs(x, x[perm]), ours(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(theirs(x, x[perm]), theirs(x), atol=1e-3)


def test_top_errors_are_percent_of_the_batch_missed(bench):
    output = torch.tensor([[0., 1, 2, 3, 4, 5], [5., 4, 3, 2, 1, 0], [0., 0, 0, 0, 9, 1], [1., 2, 3, 4, 5, 6]])
    target = torch.tensor([5, 1, 5, 0])  # top-1 right once (sample 0); top-5 misses only sample 3's class 0
    top1, top5 = bench.top_errors(output, target)
    assert top1.shape == (1,) and top1.item() == 75.0 and top5.item() == 25.0


@pytest.mark.parametrize('argv, message', [
    (['--arms', 'authors,fast'], "--arms 'authors,fast': give one or more of authors,fp32,bf16"),
    (['--model', 'resnet26d'], '--model resnet26d: no resnet26d_moex in'),
    (['--steps', '0'], '--steps 0: must be at least 1'),
    (['--device', 'tpu:x'], '--device tpu:x: not a device'),
])
def test_a_bad_option_is_one_line_naming_it(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow  # about 10 s on a CPU
def test_runs_on_the_cpu_and_prints_the_ratio_table(bench, capsys):
    argv = ['--model', 'pyramidnet110_a48', '--batch-size', '4', '--steps', '1', '--repeats', '2', '--warmup', '0',
            '--device', 'cpu']
    medians = bench.main(argv)
    out = capsys.readouterr().out
    assert re.search(r'^device: cpu .*torch .*timm .*triton ', out, re.M)
    assert 'command: python benchmarks/bench_pyramidnet_step.py ' + ' '.join(argv) in out
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip('|').split('|')] for line in out.splitlines() if line.startswith('| '))}
    assert list(rows) == ['arm', 'authors', 'fp32', 'bf16'] and rows['arm'][2] == 'vs authors'
    assert rows['authors'][2] == '1.00'
    for arm in ('fp32', 'bf16'):
        assert float(rows[arm][2]) == pytest.approx(medians[arm] / medians['authors'], abs=0.01)
