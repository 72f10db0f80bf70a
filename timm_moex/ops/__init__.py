"""The op: moment exchange and the moment arithmetic under it (PyTorch ops, and fused Triton kernels on CUDA)."""
from .moex import MOEX_IMPLS, check_impl, moment_exchange
from .moments import MOEX_NORMS, mix_moments, moment_shape, parse_norm, perturb_moments
