"""compile_backend: which torch.compile backend a run uses, the modes that go with it, and the one-line fallback of
'cudagraphs' off CUDA."""
import pytest
import timm
import torch
from accelerate import Accelerator

import train_moex
from timm_moex.train import RESUME_MAY_CHANGE, ConfigError, load_config
from timm_moex.train.builders import compile_model


def config(*extra):
    return load_config(['--model', 'resnet10t', '--compile', *extra], check_paths=False)


@pytest.fixture
def recorded_compiles(monkeypatch):
    """torch.compile replaced by a recorder that returns the model as it is."""
    calls = []

    def record(model, **kwargs):
        calls.append(kwargs)
        return model
    monkeypatch.setattr(torch, 'compile', record)
    return calls


def test_the_default_is_inductor_with_the_runs_mode(recorded_compiles):
    model = timm.create_model('resnet10t', num_classes=2)
    compile_model(config('--compile-mode', 'reduce-overhead'), model, Accelerator(cpu=True))
    assert recorded_compiles == [dict(backend='inductor', dynamic=False, mode='reduce-overhead')]


def test_cudagraphs_off_cuda_says_so_in_one_line_and_compiles_eager(recorded_compiles, capsys):
    model = timm.create_model('resnet10t', num_classes=2)
    assert compile_model(config('--compile-backend', 'cudagraphs'), model, Accelerator(cpu=True)) is model
    assert recorded_compiles == [dict(backend='eager', dynamic=False)]
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["compile_backend: 'cudagraphs' needs a CUDA device and this run is on cpu: compiling with "
                     "the 'eager' backend instead"]


def test_a_backend_without_modes_refuses_a_mode():
    with pytest.raises(ConfigError, match=r"compile_mode: 'reduce-overhead' is a mode of the inductor backend, not "
                                          r"of compile_backend 'cudagraphs'"):
        config('--compile-backend', 'cudagraphs', '--compile-mode', 'reduce-overhead')
    with pytest.raises(ConfigError, match=r"compile_backend: 'tensorrt' is not one of inductor, cudagraphs, eager"):
        config('--compile-backend', 'tensorrt')


def test_the_backend_may_change_on_resume():
    assert 'compile_backend' in RESUME_MAY_CHANGE


@pytest.mark.slow
def test_a_cudagraphs_run_on_a_cpu_trains_with_the_eager_backend(run_args, tmp_path, capsys):
    torch._dynamo.reset()
    results = train_moex.main(run_args('--moex', '--moex-prob', '1', '--compile', '--compile-backend', 'cudagraphs',
                                       '--epochs', '1', out=tmp_path / 'cg'))
    assert "compiling with the 'eager' backend instead" in capsys.readouterr().out
    assert results['last']['epoch'] == 1
