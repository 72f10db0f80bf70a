"""Where MixStyle and DSU happen: forward hooks on several layers that change feature moments in training.

MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021) mixes each sample's
instance-norm moments with another sample's; DSU (Li et al., "Uncertainty Modeling for
Out-of-Distribution Generalization", ICLR 2022) shifts them by Gaussian noise scaled with their
spread over the batch. Neither changes a label: a model trains with them as it is, beside a
MoEx hook, Mixup or CutMix. In each training forward every hooked layer applies the method with
probability ``p``, on its own; in eval mode the hooks do nothing. All draws (the coin, the
weights, the pairing, the noise) come from torch's default generators, so ``torch.manual_seed``
makes a run reproducible.
"""
import warnings
from typing import List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet
from timm.models._features import FeatureGetterNet

from ..ops.moments import mix_moments, moment_shape, perturb_moments
from ..utils.checks import check_beta_alpha, check_choice, check_unit_interval
from ..utils.model import unwrap_model
from ..utils.random import coin
from .layers import feature_wrapper_layer, hookable_model, resolve_moex_layer, top_level_names

__all__ = [
    'StyleHook', 'MixStyleHook', 'DSUHook', 'attach_mixstyle', 'attach_dsu', 'get_mixstyle_hook', 'get_dsu_hook',
    'mixstyle_layers', 'dsu_layers', 'MIXSTYLE_MIXES',
]

MIXSTYLE_MIXES = ('random', 'crossdomain')
"""Who lends sample i the moments it mixes with: any sample, or a sample of another domain."""

_HOOK_ATTRS = {'mixstyle': '_mixstyle_hook', 'dsu': '_dsu_hook'}
# timm's features_only wrappers that do not keep the model itself (FeatureGetterNet keeps it as .model)
_RENAMING_WRAPPERS = (FeatureDictNet, FeatureGraphNet, FeatureHookNet)


def _stem_and_stages(model: nn.Module) -> Tuple[Optional[str], str, List[str]]:
    """(the first convolution if it is in the stem, the stem output, the stages) of a plain model, by name."""
    stem = resolve_moex_layer(model, 'stem')
    info = getattr(model, 'feature_info', None)
    info = getattr(info, 'info', info)  # a FeatureInfo object or a list of dicts
    if not info:
        raise ValueError(
            f'{type(model).__name__} has no feature_info to find its stages in; pass layers= (dotted module names), '
            f'e.g. among {top_level_names(model)}')
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def in_stem(name: str) -> bool:
        return order[name] <= order[stem] or name.startswith(stem + '.')

    # feature_info lists the stem's map (when it has one), then each stage's
    stages = [entry['module'] for entry in info if not in_stem(entry['module'])]
    if not stages:
        raise ValueError(f"{type(model).__name__}'s feature_info names no module after its stem {stem!r}; "
                         "pass layers=")
    conv = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return (conv if conv is not None and conv != stem and in_stem(conv) else None), stem, stages


def _plain_layers(model: nn.Module, method: str) -> List[str]:
    first_conv, stem, stages = _stem_and_stages(model)
    if method == 'mixstyle':
        return stages[:2]
    return ([first_conv] if first_conv else []) + [stem] + stages


def _plain_architecture(wrapper: nn.Module) -> nn.Module:
    """The architecture inside a renaming features_only wrapper, built on the meta device (no memory, no weights)."""
    arch = (getattr(wrapper, 'pretrained_cfg', None) or {}).get('architecture')
    if arch is None:
        raise ValueError(
            f"Cannot find the layers of {type(wrapper).__name__}: timm's features_only wrapper keeps neither the "
            f"model's class nor its architecture name. Pass layers= among its modules: {top_level_names(wrapper)}")
    with torch.device('meta'):
        return timm.create_model(arch, pretrained=False)


def _default_layers(model: nn.Module, method: str) -> List[str]:
    model = unwrap_model(model)
    if isinstance(model, FeatureGetterNet):
        return ['model.' + name for name in _default_layers(model.model, method)]
    if isinstance(model, _RENAMING_WRAPPERS):  # FeatureListNet is a FeatureDictNet
        plain = _plain_architecture(model)
        layers = []
        for name in _plain_layers(plain, method):
            try:
                layers.append(feature_wrapper_layer(model, plain, name))
            except ValueError:
                continue  # a stage after the wrapper's last output: the wrapper does not keep it
        if not layers:
            raise ValueError(f'{type(model).__name__} keeps none of the layers {_plain_layers(plain, method)} of '
                             f'{type(plain).__name__}; pass layers= among its modules: {top_level_names(model)}')
        return layers
    return _plain_layers(model, method)


def mixstyle_layers(model: nn.Module) -> List[str]:
    """Where MixStyle goes by default: after the first two stages.

    The authors' placement in ResNet: after ``layer1`` and ``layer2``. The stages are the
    entries of the model's ``feature_info`` after its stem (see ``resolve_moex_layer``).

    Args:
        model: A timm model (also inside DDP or torch.compile wrappers, or a timm
            ``features_only`` wrapper).

    Returns:
        The dotted module names.

    Raises:
        ValueError: The stem or the stages cannot be found.
    """
    return _default_layers(model, 'mixstyle')


def dsu_layers(model: nn.Module) -> List[str]:
    """Where DSU goes by default: after the first convolution, the stem and every stage.

    The authors' placement in ResNet: after ``conv1``, ``maxpool`` and ``layer1`` to ``layer4``.
    The stem output is ``resolve_moex_layer(model)``; the stages are the entries of the
    model's ``feature_info`` after it; the model's first convolution counts when it is part of
    the stem (and not its output).

    Args:
        model: A timm model (also inside DDP or torch.compile wrappers, or a timm
            ``features_only`` wrapper).

    Returns:
        The dotted module names.

    Raises:
        ValueError: The stem or the stages cannot be found.
    """
    return _default_layers(model, 'dsu')


class StyleHook:
    """Forward hooks on several modules that, in training, change their outputs' moments.

    In a forward of a module in training mode, the hook of that module applies the method with
    probability ``p`` (its own coin, as each of the authors' modules draws its own); otherwise,
    and always in eval mode, the output is untouched. A map with a single position (a 1x1 map)
    has no instance statistics: it is left as it is, with a warning. Subclasses say what the
    method does.

    Args:
        model: The model that holds the modules.
        layers: Dotted names of the modules whose outputs are changed.
        p: Probability that a layer applies the method in a training forward.
        eps: Added to the variances inside the square roots; >= 0.
        channel_dim: The channel dimension of the outputs; None finds it per output: tokens
            (B, N, C) and, in models whose ``output_fmt`` is 'NHWC', maps are channels-last,
            a convolution's output is NCHW, any other map follows the model.
    """

    method = ''

    def __init__(self, model: nn.Module, layers: Sequence[str], p: float = 0.5, eps: float = 1e-6,
                 channel_dim: Optional[int] = None):
        self.p = check_unit_interval('p', p)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f'eps must be a number >= 0; got {eps!r}')
        self.eps = float(eps)
        self.channel_dim = channel_dim
        if isinstance(layers, str) or not layers:
            raise ValueError(f'layers must be a non-empty sequence of dotted module names; got {layers!r}')
        modules = []
        for name in layers:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(
                    f'layer {name!r} is not a module of {type(model).__name__}; its top-level modules are '
                    f'{top_level_names(model)}') from None
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError(f'layers name one module twice: {list(layers)}')
        self.layers = tuple(layers)
        # a getter wrapper's output_fmt is the format it returns, not the one the model computes in
        layout_model = model.model if isinstance(model, FeatureGetterNet) else model
        self._nhwc = getattr(layout_model, 'output_fmt', 'NCHW') == 'NHWC'
        self._model = model
        self._modules = modules
        # The ids, not RemovableHandles, so that deep copies (EMA) remove their own hooks.
        self._hook_ids = [m.register_forward_hook(self._forward_hook).id for m in modules]

    @property
    def attached(self) -> bool:
        """Whether every layer still carries this hook (False after :meth:`remove`)."""
        return all(i in m._forward_hooks for m, i in zip(self._modules, self._hook_ids))

    def remove(self) -> None:
        """Detach the hooks; the model is exactly as it was before they were attached."""
        for module, hook_id in zip(self._modules, self._hook_ids):
            module._forward_hooks.pop(hook_id, None)
        attr = _HOOK_ATTRS.get(self.method)
        if attr and getattr(self._model, attr, None) is self:
            delattr(self._model, attr)

    def _forward_hook(self, module: nn.Module, args, output):
        if not module.training or not coin(self.p):
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f'{type(self).__name__}: a hooked layer returns {type(output).__name__}, not a tensor; '
                            f'choose other layers than {self.layers}')
        channel_dim = self.channel_dim
        if channel_dim is None:
            nhwc = self._nhwc and not isinstance(module, nn.Conv2d)
            channel_dim = -1 if output.dim() == 3 or (output.dim() == 4 and nhwc) else 1
        if output.dim() < 3 or output.numel() < 2 * output.shape[0] * output.shape[channel_dim]:
            warnings.warn(f'{type(self).__name__}: a hooked layer gives a map of shape {tuple(output.shape)}, with '
                          f'fewer than 2 positions: no instance statistics, left as it is')
            return None
        return self.restyle(output, channel_dim)

    def restyle(self, x: torch.Tensor, channel_dim: int) -> Optional[torch.Tensor]:
        """One layer's output with the method applied (None leaves it as it is).

        Args:
            x: The output.
            channel_dim: Its channel dimension.

        Returns:
            The new output, or None.
        """
        raise NotImplementedError


class MixStyleHook(StyleHook):
    """MixStyle on several layers (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021).

    Each time a layer applies it, it draws ``w ~ Beta(alpha, alpha)`` per sample and a partner
    per sample, and returns ``mix_moments(x, perm, w)``: instance-norm moments mixed as
    ``w * own + (1 - w) * partner's``, statistics detached, as in the authors' code. Usually made
    by :func:`attach_mixstyle`.

    Args:
        model, layers, p, eps, channel_dim: As :class:`StyleHook`.
        alpha: Beta(alpha, alpha) of the weights (the authors: 0.1).
        mix: 'random' (a random permutation of the batch) or 'crossdomain' (each sample's
            partner is of another domain: see :meth:`set_domains`).
        detach: Statistics as constants (the authors' code); False lets gradients flow
            through them.
    """

    method = 'mixstyle'

    def __init__(self, model: nn.Module, layers: Sequence[str], p: float = 0.5, alpha: float = 0.1,
                 mix: str = 'random', eps: float = 1e-6, detach: bool = True, channel_dim: Optional[int] = None):
        self.alpha = check_beta_alpha(alpha, 0.1)
        self.mix = check_choice('mix', mix, MIXSTYLE_MIXES)
        self.detach = bool(detach)
        self._domains: Optional[torch.Tensor] = None
        super().__init__(model, layers, p=p, eps=eps, channel_dim=channel_dim)

    def __repr__(self) -> str:
        return (f'MixStyleHook(layers={list(self.layers)}, p={self.p}, alpha={self.alpha}, mix={self.mix!r}, '
                f'eps={self.eps}, detach={self.detach})')

    def set_domains(self, domains: Optional[torch.Tensor]) -> None:
        """The domain of each sample of the batches to come, for ``mix='crossdomain'``.

        Call it before every forward with that batch's domains (they stay until set again);
        None goes back to the authors' convention, batches whose first and second halves come
        from two domains.

        Args:
            domains: Integer tensor of shape (B,), or None.

        Raises:
            ValueError: ``mix`` is not 'crossdomain', or ``domains`` is not a 1-D integer tensor.
        """
        if self.mix != 'crossdomain':
            raise ValueError(f"domains pair samples for mix='crossdomain'; this hook has mix={self.mix!r}")
        if domains is not None and (not isinstance(domains, torch.Tensor) or domains.dim() != 1
                                    or domains.is_floating_point() or domains.is_complex()):
            raise ValueError(f'domains must be a 1-D integer tensor, one domain per sample; got {domains!r:.80}')
        self._domains = domains

    def pairing(self, batch_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Draw each sample's partner, ``perm[i]``, for one layer.

        'random': a random permutation. 'crossdomain' with domains set: a sample drawn
        uniformly among those of another domain. 'crossdomain' without: the sample of a
        random permutation of the other half of the batch (the authors' code).

        Args:
            batch_size: B.
            device: Where the pairing lives.

        Returns:
            An int64 tensor of shape (B,).

        Raises:
            ValueError: Cross-domain pairing is impossible: the domains do not match the batch,
                all samples share one domain, or without domains the batch is odd.
        """
        if self.mix == 'random':
            return torch.randperm(batch_size, device=device)
        domains = self._domains
        if domains is None:
            if batch_size % 2:
                raise ValueError(
                    f"mix='crossdomain' without domains pairs the two halves of the batch (the authors' batches "
                    f"of two domains); got an odd batch of {batch_size}. Call set_domains(domains) first.")
            half = batch_size // 2
            return torch.cat([torch.randperm(half, device=device) + half, torch.randperm(half, device=device)])
        if domains.shape != (batch_size,):
            raise ValueError(f'set_domains gave {tuple(domains.shape)[0]} domains for a batch of {batch_size}; '
                             'call set_domains with the domains of each batch')
        domains = domains.to(device)
        other = domains[:, None] != domains[None, :]
        if not bool(other.any()):
            raise ValueError("mix='crossdomain' needs samples of at least two domains in the batch; all share one")
        return torch.multinomial(other.float(), 1).squeeze(1)

    def restyle(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        batch = x.shape[0]
        concentration = torch.tensor(self.alpha, device=x.device)
        # alpha was checked when the hook was made; Beta's own argument check reads the device back every forward
        weight = torch.distributions.Beta(concentration, concentration, validate_args=False).sample((batch,))
        perm = self.pairing(batch, x.device)
        return mix_moments(x, perm, weight, norm='in', eps=self.eps, channel_dim=channel_dim, detach=self.detach)


class DSUHook(StyleHook):
    """DSU on several layers (Li et al., "Uncertainty Modeling for Out-of-Distribution Generalization", ICLR 2022).

    Each time a layer applies it, it draws standard-normal noise per sample and channel for the
    means and for the standard deviations and returns ``perturb_moments(x, noise_mean,
    noise_std)``; gradients flow through the statistics, as in the authors' code. A batch of one
    sample has no spread over the batch and is left as it is. Usually made by :func:`attach_dsu`.

    Args:
        model, layers, p, eps, channel_dim: As :class:`StyleHook`.
    """

    method = 'dsu'

    def __repr__(self) -> str:
        return f'DSUHook(layers={list(self.layers)}, p={self.p}, eps={self.eps})'

    def restyle(self, x: torch.Tensor, channel_dim: int) -> Optional[torch.Tensor]:
        if x.shape[0] < 2:
            return None
        noise = torch.randn(2, *moment_shape(x, 'in', channel_dim), device=x.device)
        return perturb_moments(x, noise[0], noise[1], norm='in', eps=self.eps, channel_dim=channel_dim)


def attach_mixstyle(
        model: nn.Module,
        layers: Optional[Sequence[str]] = None,
        p: float = 0.5,
        alpha: float = 0.1,
        mix: str = 'random',
        eps: float = 1e-6,
        detach: bool = True,
        channel_dim: Optional[int] = None,
) -> MixStyleHook:
    """Attach MixStyle to ``model``: after its first two stages unless ``layers`` says otherwise.

    The defaults are the authors' (p 0.5, alpha 0.1, eps 1e-6, instance-norm statistics
    detached). Attach before ``torch.compile`` and before wrapping in DDP.

    Args:
        model: The model (DDP / DataParallel wrappers are opened; a compiled model is refused),
            also a timm ``features_only`` wrapper.
        layers: Dotted module names; None takes :func:`mixstyle_layers`.
        p: Probability that a layer mixes in a training forward.
        alpha: Beta(alpha, alpha) of the mixing weights.
        mix: 'random' or 'crossdomain' (``MIXSTYLE_MIXES``; see :meth:`MixStyleHook.set_domains`).
        eps: Added to the variance inside the square root.
        detach: Statistics as constants, as the authors' code.
        channel_dim: Overrides the layout found per output (see :class:`StyleHook`).

    Returns:
        The hook, also kept on the model (see :func:`get_mixstyle_hook`).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` is compiled or already has MixStyle, the layers cannot be found,
            or an argument is out of range.
    """
    model = hookable_model(model, _HOOK_ATTRS['mixstyle'], 'attach_mixstyle', 'the hooks')
    hook = MixStyleHook(model, mixstyle_layers(model) if layers is None else layers, p=p, alpha=alpha, mix=mix,
                        eps=eps, detach=detach, channel_dim=channel_dim)
    setattr(model, _HOOK_ATTRS['mixstyle'], hook)
    return hook


def attach_dsu(
        model: nn.Module,
        layers: Optional[Sequence[str]] = None,
        p: float = 0.5,
        eps: float = 1e-6,
        channel_dim: Optional[int] = None,
) -> DSUHook:
    """Attach DSU to ``model``: after its first convolution, its stem and every stage unless ``layers`` says otherwise.

    The defaults are the authors' (p 0.5, eps 1e-6). Attach before ``torch.compile`` and
    before wrapping in DDP.

    Args:
        model: The model (DDP / DataParallel wrappers are opened; a compiled model is refused),
            also a timm ``features_only`` wrapper.
        layers: Dotted module names; None takes :func:`dsu_layers`.
        p: Probability that a layer perturbs in a training forward.
        eps: Added to the variances inside the square roots.
        channel_dim: Overrides the layout found per output (see :class:`StyleHook`).

    Returns:
        The hook, also kept on the model (see :func:`get_dsu_hook`).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` is compiled or already has DSU, the layers cannot be found, or an
            argument is out of range.
    """
    model = hookable_model(model, _HOOK_ATTRS['dsu'], 'attach_dsu', 'the hooks')
    hook = DSUHook(model, dsu_layers(model) if layers is None else layers, p=p, eps=eps, channel_dim=channel_dim)
    setattr(model, _HOOK_ATTRS['dsu'], hook)
    return hook


def get_mixstyle_hook(model: nn.Module) -> Optional[MixStyleHook]:
    """The MixStyle hook attached to ``model``.

    Args:
        model: A model, also inside DDP or torch.compile wrappers.

    Returns:
        Its hook, or None when it has none.
    """
    return getattr(unwrap_model(model), _HOOK_ATTRS['mixstyle'], None)


def get_dsu_hook(model: nn.Module) -> Optional[DSUHook]:
    """The DSU hook attached to ``model``.

    Args:
        model: A model, also inside DDP or torch.compile wrappers.

    Returns:
        Its hook, or None when it has none.
    """
    return getattr(unwrap_model(model), _HOOK_ATTRS['dsu'], None)
