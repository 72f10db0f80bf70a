"""The fused Triton kernels of moment_exchange, on the GPU or, without one, in Triton's CPU
interpreter (conftest.py sets TRITON_INTERPRET=1 before Triton is imported).

They must give what the PyTorch-ops implementation gives (itself checked against the float64
formula in test_moex.py), forward and backward, in every layout they accept.
"""
import os
import re
import subprocess
import sys
import warnings

import pytest
import timm
import torch

import timm_moex
import timm_moex.ops.moex as moex
from timm_moex import attach_moex, moment_exchange

kernels = pytest.importorskip('timm_moex.ops.moex_triton', reason='Triton is not installed')
DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
if DEVICE.type == 'cpu' and not kernels.interpreted():
    pytest.skip('no GPU, and Triton was imported before TRITON_INTERPRET=1 was set', allow_module_level=True)


# Without a GPU the kernels run in Triton's Python interpreter: the op-level checks take seconds there.
slow_when_interpreted = pytest.mark.slow if DEVICE.type == 'cpu' else (lambda test: test)
PERM = torch.tensor([2, 0, 3, 1, 1], device=DEVICE)  # sample 1 is the donor of two samples, sample 4 of none
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float16: dict(rtol=5e-3, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=7e-2)}


def both(x: torch.Tensor, perm: torch.Tensor = PERM, impls=('triton', 'torch'), **kwargs):
    """(output, gradient) of the fused and the PyTorch-ops implementation for one upstream gradient."""
    torch.manual_seed(1)
    results = []
    upstream = None
    for impl in impls:
        leaf = x.detach().clone().requires_grad_()
        out = moment_exchange(leaf, perm, impl=impl, **kwargs)
        if upstream is None:
            upstream = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        results.append((out, grad))
    return results


def features(shape, dtype, channels_last=False):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(device=DEVICE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@slow_when_interpreted
@pytest.mark.parametrize('dtype', list(TOL))
@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'nhwc', 'tokens', 'ncdhw'])
def test_pono_equals_pytorch_ops(layout, dtype):
    shape, channel_dim = {'nchw': ((5, 8, 6, 7), 1), 'channels_last': ((5, 8, 6, 7), 1), 'nhwc': ((5, 6, 7, 8), -1),
                          'tokens': ((5, 11, 9), -1), 'ncdhw': ((5, 6, 3, 4, 5), 1)}[layout]
    x = features(shape, dtype, channels_last=layout == 'channels_last')
    (out, grad), (expected, expected_grad) = both(x, channel_dim=channel_dim)
    assert out.dtype == dtype and out.stride() == expected.stride() and grad.stride() == x.stride()
    torch.testing.assert_close(out, expected, **TOL[dtype])
    torch.testing.assert_close(grad, expected_grad, **TOL[dtype])


@slow_when_interpreted
@pytest.mark.parametrize('norm', ['gpono2', 'gpono4'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_grouped_pono_equals_pytorch_ops(norm, channels_last):
    x = features((5, 8, 6, 7), torch.float64, channels_last)
    (out, grad), (expected, expected_grad) = both(x, norm=norm)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


@pytest.mark.parametrize('channels, positions', [(3, 5), (64, 100), (300, 9)])
def test_tiles_cover_every_channel_and_position(channels, positions):
    # 3 channels pad a 4-wide tile, 64 x 100 spans two position blocks, 300 channels one 512-wide tile.
    x = features((3, channels, positions), torch.float64)
    perm = torch.tensor([1, 2, 0], device=DEVICE)
    (out, grad), (expected, expected_grad) = both(x, perm)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


def test_detach_equals_pytorch_ops():
    x = features((5, 8, 4, 3), torch.float64)
    (out, grad), (expected, expected_grad) = both(x, detach=True)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])
    (_, full_grad), _ = both(x)
    assert not torch.allclose(grad, full_grad), 'detach must drop the gradient through the donor moments'


@slow_when_interpreted
@pytest.mark.parametrize('norm', ['pono', 'gpono2'])
def test_gradcheck(norm):
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    perm = torch.tensor([1, 2, 1], device=DEVICE)
    assert torch.autograd.gradcheck(lambda t: moment_exchange(t, perm, norm=norm, impl='triton'), (x,), fast_mode=True)


def test_identity_permutation_returns_input_and_int32_perm():
    x = features((4, 8, 5, 5), torch.float32)
    out = moment_exchange(x, torch.arange(4, dtype=torch.int32, device=DEVICE), impl='triton')
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_strided_perm_and_upstream_gradient():
    x = features((4, 8, 5, 6), torch.float64).requires_grad_()
    perm = torch.tensor([3, 0, 3, 1, 2, 0, 1, 0], device=DEVICE)[::2]  # a non-contiguous view: [3, 3, 2, 1]
    upstream = torch.randn(4, 8, 6, 5, dtype=torch.float64, device=DEVICE).transpose(2, 3)  # positions do not flatten
    grads = [torch.autograd.grad(moment_exchange(x, perm, impl=impl), x, upstream)[0] for impl in ('triton', 'torch')]
    torch.testing.assert_close(grads[0], grads[1], **TOL[torch.float64])


def test_hook_gives_the_same_training_output_and_gradients_with_either_impl():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4, pretrained=False).to(DEVICE).train()
    hook = attach_moex(model, impl='triton')
    x = torch.randn(3, 3, 32, 32, device=DEVICE)
    perm = torch.tensor([2, 0, 1], device=DEVICE)
    outs, grads = [], []
    for impl in ('triton', 'torch'):
        hook.impl = impl
        hook.arm(perm)
        outs.append(model(x))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), list(model.parameters())))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_auto_picks_the_kernels_on_cuda_only(device, monkeypatch):
    if device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('no GPU')
    ran = []
    forward = kernels.pono_exchange_forward
    monkeypatch.setattr(kernels, 'pono_exchange_forward', lambda *args: ran.append(1) or forward(*args))
    moment_exchange(torch.randn(2, 4, 3, 3, device=device), torch.tensor([1, 0], device=device))
    assert ran == ([1] if device == 'cuda' else [])


def cannot(why: str) -> str:
    """The full message of impl='triton' refusing an input, as a regular expression."""
    return '^' + re.escape(f"impl='triton' cannot be used: {why}. Use impl='auto' or 'torch'.") + '$'


@pytest.mark.parametrize('kwargs, match', [
    (dict(norm='in'), cannot("the kernels cover 'pono' and 'gponoG', not norm='in'")),
    (dict(norm='gn2'), cannot("the kernels cover 'pono' and 'gponoG', not norm='gn2'")),
    (dict(x=torch.randn(2, 4, 5, 6).transpose(2, 3)),
     cannot('the positions of x (shape (2, 4, 6, 5), strides (120, 30, 1, 6)) do not flatten into one stride')),
    (dict(x=torch.randn(2, 4100, 2)), cannot("a group of 4100 channels is wider than the kernels' 2048")),
    (dict(x=torch.randn(2, 4100, 2), norm='gpono2'), cannot("a group of 2050 channels is wider than the kernels' 2048")),
    (dict(x=torch.randn(0, 4, 3, 3), perm=torch.zeros(0, dtype=torch.long)), cannot('x is empty')),
    (dict(impl='fused'), r"^impl='fused' is not an implementation of moment_exchange; "
                         r"use one of \('auto', 'triton', 'torch'\)$"),
])
def test_triton_refuses_what_it_does_not_cover(kwargs, match):
    x = kwargs.pop('x', torch.randn(2, 4, 3, 3)).to(DEVICE)
    perm = kwargs.pop('perm', torch.tensor([1, 0])).to(DEVICE)
    impl = kwargs.pop('impl', 'triton')
    with pytest.raises(ValueError, match=match):
        moment_exchange(x, perm, impl=impl, **kwargs)
    if impl == 'triton':  # 'auto' takes the PyTorch ops for the same input
        torch.testing.assert_close(moment_exchange(x, perm, impl='auto', **kwargs),
                                   moment_exchange(x, perm, impl='torch', **kwargs))


def never_load(monkeypatch):
    def load():
        raise AssertionError('the Triton kernels were loaded')
    monkeypatch.setattr(moex, '_load_triton_kernels', load)


def test_the_pytorch_ops_never_load_triton(monkeypatch):
    """impl='torch', and impl='auto' off CUDA, do not even import the kernels (a broken Triton stays silent)."""
    never_load(monkeypatch)
    x, perm = torch.randn(2, 4, 3, 3), torch.tensor([1, 0])
    expected = moex.replace_moments(x, x.view(2, 1, 4, 3, 3), (2,), 1e-5, 'exchange', (perm,))
    torch.testing.assert_close(moment_exchange(x.to(DEVICE), perm.to(DEVICE), impl='torch').cpu(), expected)
    torch.testing.assert_close(moment_exchange(x, perm, impl='auto'), expected)


def test_under_torch_compile_the_kernels_are_not_loaded(monkeypatch):
    never_load(monkeypatch)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    x, perm = torch.randn(2, 4, 3, 3, device=DEVICE), torch.tensor([1, 0], device=DEVICE)
    with pytest.raises(ValueError, match=cannot('torch.compile traces the PyTorch ops (Inductor fuses them)')):
        moment_exchange(x, perm, impl='triton')
    monkeypatch.undo()
    reference = moment_exchange(x, perm, impl='torch')
    never_load(monkeypatch)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    torch.testing.assert_close(moment_exchange(x, perm, impl='auto'), reference)


def test_a_missing_triton_is_reported_once_and_not_retried(monkeypatch):
    monkeypatch.setattr(moex, '_triton_kernels', None)
    monkeypatch.setattr(moex, '_triton_import_error', None)
    monkeypatch.delattr(timm_moex.ops, 'moex_triton', raising=False)
    monkeypatch.setitem(sys.modules, 'timm_moex.ops.moex_triton', None)  # what an absent Triton looks like to the import
    x, perm = torch.randn(2, 4, 3, 3, device=DEVICE), torch.tensor([1, 0], device=DEVICE)
    missing = cannot('Triton is not installed (import of timm_moex.ops.moex_triton halted; None in sys.modules)')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing to warn about: the PyTorch ops are the expected path then
        with pytest.raises(ValueError, match=missing):
            moment_exchange(x, perm, impl='triton')
    monkeypatch.setitem(sys.modules, 'timm_moex.ops.moex_triton', kernels)
    with pytest.raises(ValueError, match=missing):  # the import is tried once per process, not on every call
        moment_exchange(x, perm, impl='triton')


@pytest.mark.slow
def test_compiled_hook_traces_the_pytorch_ops():
    model = timm.create_model('resnet18', num_classes=4, pretrained=False).to(DEVICE).train()
    hook = attach_moex(model)  # impl='auto'
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(3, 3, 32, 32, device=DEVICE)
    perm = torch.tensor([2, 0, 1], device=DEVICE)
    hook.arm(perm)
    out = compiled(x)
    hook.arm(perm)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)

    hook.impl = 'triton'
    hook.arm(perm)
    with pytest.raises(Exception, match='torch.compile'):
        torch.compile(model, fullgraph=True, backend='aot_eager')(x)


def test_a_failing_kernel_names_the_fallback(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise ValueError('unsupported on this GPU')
            return launch
    monkeypatch.setattr(kernels, '_forward_kernel', Broken())
    with pytest.raises(RuntimeError, match=r"unsupported on this GPU.*impl='torch'"):
        moment_exchange(torch.randn(2, 4, 3, 3, device=DEVICE), torch.tensor([1, 0], device=DEVICE), impl='triton')


AOT_COMPILE = '''
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import timm_moex.ops.moex_triton as k

DATA = {'x_ptr', 'out_ptr', 'g_ptr', 'dx_ptr'}
for dtype, acc, group_c, groups, block_s in [('bf16', tl.float32, 64, 1, 64), ('fp16', tl.float32, 16, 2, 256),
                                             ('fp64', tl.float64, 3, 4, 1024)]:
    stat = '*fp64' if dtype == 'fp64' else '*fp32'
    sizes = dict(GROUPS=groups, GROUP_C=group_c, BLOCK_C=triton.next_power_of_2(group_c), BLOCK_S=block_s, ACC=acc)
    for kernel, extra in [(k._forward_kernel, dict(EPS=1e-5)), (k._backward_kernel, dict(DONOR_GRAD=True, BLOCK_B=64))]:
        constexprs = dict(sizes, **extra)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = 'constexpr'
            elif name.endswith('_ptr'):
                signature[name] = '*' + dtype if name in DATA else '*i64' if name == 'perm_ptr' else stat
            else:
                signature[name] = 'i32'
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget('cuda', 90, 32),
                                  options=dict(num_warps=8))
        assert compiled.asm['cubin'], kernel.fn.__name__
        if kernel is k._forward_kernel and dtype == 'fp64':
            print('fp64 forward ptx', compiled.asm['ptx'], 'end of ptx')
print('compiled', flush=True)
'''


@pytest.mark.slow
def test_kernels_compile_for_an_h100_with_eps_exact_in_float64():
    """The interpreter does not run Triton's compiler: compile the kernels for sm_90 ahead of time
    (Triton's own ptxas, no GPU needed), in a process where Triton is not interpreting.

    The interpreter computes with eps as Python gives it; a compiled kernel takes a float argument
    as float32, so the float64 kernel must carry eps = 1e-5 as the float64 constant itself
    (0x3EE4F8B588E368F1), not float32(1e-5) widened (0x3EE4F8B580000000) from an .f32 parameter."""
    pytest.importorskip('triton.backends.nvidia', reason="Triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, '-c', AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'compiled' in proc.stdout, proc.stderr[-3000:]
    ptx = proc.stdout[proc.stdout.index('fp64 forward ptx'):proc.stdout.index('end of ptx')]
    assert '0d3EE4F8B588E368F1' in ptx.upper().replace('0D', '0d')
    assert '.param .f32' not in ptx and 'cvt.f64.f32' not in ptx


class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every ATen op run under it, except while ``muted`` (a kernel launch: in
    the interpreter, Triton's own copies between tensors and numpy)."""

    def __init__(self):
        super().__init__()
        self.ops, self.muted = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's arguments, then launches the kernel
    (with ``ops``, if given, muted)."""

    def __init__(self, kernel, launches, ops=None):
        self.kernel, self.launches, self.ops = kernel, launches, ops

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel.fn.__name__, args))
            if self.ops is not None:
                self.ops.muted = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                if self.ops is not None:
                    self.ops.muted = False
        return launch


@pytest.mark.parametrize('detach', [False, True])
def test_one_launch_per_direction_and_nothing_that_waits_on_the_host(detach, monkeypatch):
    """The kernels' forward and backward each launch one kernel, allocate their outputs and do nothing
    else: no fill, no copy, no reduction, no read of a value on the host (``_local_scalar_dense``)."""
    launches, ops = [], AtenOps()
    for name in ('_forward_kernel', '_backward_kernel'):
        monkeypatch.setattr(kernels, name, LaunchRecorder(getattr(kernels, name), launches, ops))
    x = features((5, 8, 3, 3), torch.float32, channels_last=True)
    upstream = torch.randn(5, 8, 3, 3, device=DEVICE)
    with ops:
        out, mean, std = kernels.pono_exchange_forward(x, PERM, 2, 1, 1e-5)
        assert [name for name, _ in launches] == ['_forward_kernel']
        dx = kernels.pono_exchange_backward(upstream, x, PERM, mean, std, 1, detach)
    assert [name for name, _ in launches] == ['_forward_kernel', '_backward_kernel']
    assert set(ops.ops) <= {'empty', 'empty_like', 'empty_strided'}, ops.ops
    leaf = x.detach().requires_grad_()
    expected = moment_exchange(leaf, PERM, norm='gpono2', detach=detach, impl='torch')
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(dx, torch.autograd.grad(expected, leaf, upstream)[0], **TOL[torch.float32])


def test_no_float_reaches_a_kernel_as_an_argument(monkeypatch):
    """A compiled Triton kernel takes a Python float argument as float32 (the interpreter keeps it a
    Python float, so a float64 check on the CPU cannot see it): eps must be a compile-time constant,
    made in the statistics' dtype inside the kernel."""
    launches = []
    monkeypatch.setattr(kernels, '_forward_kernel', LaunchRecorder(kernels._forward_kernel, launches))
    moment_exchange(features((3, 4, 2, 2), torch.float64), torch.tensor([2, 0, 1], device=DEVICE), eps=1e-5,
                    impl='triton')
    ((_, args),) = launches
    assert not [a for a in args if isinstance(a, float)]


def test_float64_groups_of_two_channels_with_variance_near_eps():
    """Where a group's variance is near eps, the float64 gradient of a group of 2 channels cancels
    down to eps / (variance + eps) of its terms: eps rounded to float32 (1e-5 * (1 - 2.5e-9)) moves
    it by ~1e-8 relative, rounding by ~1e-16 times the cancelled terms. On a GPU this fails a float32
    eps; the interpreter keeps eps a Python float (see the test above)."""
    x = features((4, 8, 3, 3), torch.float64)
    x[:, 1::2] = x[:, 0::2] + 0.003 * torch.randn_like(x[:, 0::2])  # each group's 2 channels a few eps apart
    (out, grad), (expected, expected_grad) = both(x, torch.tensor([1, 2, 3, 0], device=DEVICE), norm='gpono4')
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


def test_recipients_are_found_across_blocks_of_the_batch_and_through_negative_indices(monkeypatch):
    """The backward scans perm in blocks for the samples that took a sample's moments: two blocks
    of 2 indices here, with negative indices, a donor of two samples and one of none."""
    monkeypatch.setattr(kernels, '_MAX_BLOCK_B', 2)
    x = features((5, 8, 3, 3), torch.float64)
    ((out, grad),) = both(x, torch.tensor([-3, 0, 4, -4, 1], device=DEVICE), impls=('triton',))
    ((expected, expected_grad),) = both(x, torch.tensor([2, 0, 4, 1, 1], device=DEVICE), impls=('torch',))
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


def test_donor_indices_count_from_the_end_and_out_of_range_ones_poison_their_sample():
    x = features((4, 8, 3, 3), torch.float64)
    wrapped = moment_exchange(x, torch.tensor([-1, 0, -4, 2], device=DEVICE), impl='triton')
    torch.testing.assert_close(wrapped, moment_exchange(x, torch.tensor([3, 0, 0, 2], device=DEVICE), impl='torch'))
    bad = torch.tensor([1, 4, 0, -5], device=DEVICE)
    if DEVICE.type == 'cpu':  # a CPU perm is checked before the kernels (a CUDA one is not: no host sync)
        with pytest.raises(ValueError, match=r'^perm\[1\] = 4 is not a sample of the batch of 4'):
            moment_exchange(x, bad, impl='triton')
    out = kernels.pono_exchange_forward(x, bad, 1, 1, 1e-5)[0]
    assert torch.isnan(out[1]).all() and torch.isnan(out[3]).all()
    assert torch.isfinite(out[[0, 2]]).all()


def test_a_triton_that_fails_to_load_leaves_the_pytorch_ops(monkeypatch):
    import builtins
    import timm_moex.ops.moex as moex
    real_import = builtins.__import__

    def failing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == 'timm_moex.ops.moex_triton':  # the kernels' module, however it is imported
            raise AttributeError("module 'triton' has no attribute 'knobs'")
        return real_import(name, globals, locals, fromlist, level)
    monkeypatch.setattr(builtins, '__import__', failing_import)
    monkeypatch.setattr(moex, '_triton_kernels', None)
    monkeypatch.setattr(moex, '_triton_import_error', None)
    x, perm = torch.randn(2, 4, 3, 3, device=DEVICE), torch.tensor([1, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"moex_triton failed to load \(AttributeError.*knobs"):
        with pytest.warns(UserWarning, match="PyTorch ops"):
            moment_exchange(x, perm, impl='triton')
    torch.testing.assert_close(moment_exchange(x, perm, impl='auto'), moment_exchange(x, perm, impl='torch'))


def test_grouped_pono_on_a_small_input():
    """A grouped case small enough for the fast subset: the kernels get the groups, not one group of all channels."""
    x = features((3, 8, 2, 3), torch.float64)
    (out, grad), (expected, expected_grad) = both(x, torch.tensor([2, 0, 1], device=DEVICE), norm='gpono2')
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


def test_channels_last_dim_and_the_widest_group_on_small_inputs():
    for shape, channel_dim, channels_last in (((3, 2, 3, 8), -1, False), ((3, 8, 2, 3), 1, True),
                                              ((3, kernels.MAX_GROUP_CHANNELS, 2), 1, False)):
        x = features(shape, torch.float64, channels_last)
        (out, grad), (expected, expected_grad) = both(x, torch.tensor([2, 0, 1], device=DEVICE),
                                                      channel_dim=channel_dim)
        torch.testing.assert_close(out, expected, **TOL[torch.float64])
        torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


def test_kernels_built_for_the_gpu_refuse_a_cpu_tensor(monkeypatch):
    monkeypatch.setattr(kernels, 'interpreted', lambda: False)
    with pytest.raises(ValueError, match=cannot(
            'x is on cpu; the kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1)')):
        moment_exchange(torch.randn(2, 4, 3, 3), torch.tensor([1, 0]), impl='triton')
