"""timm plumbing of a network made of a stem, stages ``layer1``..``layerN``, a final norm and a pooled head."""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.layers.helpers import get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

__all__ = ['StageNet', 'MAX_STAGES']

MAX_STAGES = 4
"""The most stages a :class:`StageNet` runs (``layer1`` to ``layer4``)."""


class StageNet(nn.Module):
    """Stage running, intermediates, initialization and head of the CIFAR networks and PyramidNet.

    A subclass registers, in this order, its stem modules and the stem's entry of
    ``feature_info``, the stages (:meth:`add_stage`), an optional final norm (``bn_final`` and
    ``act_final``) and the head (:meth:`create_head`), and defines :meth:`forward_stem`;
    :meth:`stem_pool` and :meth:`final_norm` are identities unless overridden.

    Args:
        layers: Number of blocks in each stage (1 to :data:`MAX_STAGES` stages).
        num_classes: Number of classifier outputs (0 for no classifier).
        in_chans: Number of input channels.
        drop_rate: Dropout before the classifier.

    Raises:
        ValueError: ``layers`` has no stage or more than :data:`MAX_STAGES`.
    """
    num_stages: int
    grad_checkpointing: bool

    def __init__(self, layers: Sequence[int], num_classes: int, in_chans: int, drop_rate: float):
        super().__init__()
        if not 1 <= len(layers) <= MAX_STAGES:
            raise ValueError(f'{type(self).__name__} has 1 to {MAX_STAGES} stages, got layers={tuple(layers)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_stages = len(layers)

    def add_stage(self, blocks: List[nn.Module], num_chs: int, reduction: int) -> None:
        """Register the next stage, ``layer<i>``, and its entry of ``feature_info``.

        Args:
            blocks: The stage's blocks, run in order.
            num_chs: Channels of the stage's output.
            reduction: Its stride relative to the input.
        """
        name = f'layer{len(self.feature_info)}'  # feature_info holds the stem's map, then one per stage
        self.add_module(name, nn.Sequential(*blocks))
        self.feature_info.append(dict(num_chs=num_chs, reduction=reduction, module=name))

    def create_head(self, num_features: int, num_classes: int, global_pool: str,
                    dd: Optional[Dict[str, Any]] = None) -> None:
        """Build (or rebuild) the pooling and the classifier.

        Args:
            num_features: Channels of the unpooled features.
            num_classes: Number of classifier outputs (0 for no classifier).
            global_pool: Global pooling type ('' for none).
            dd: ``device`` and ``dtype`` of the new modules.
        """
        self.num_features = num_features
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool, **(dd or {}))
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """He-normal (fan_out) convolutions, unit BN, zero classifier bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def _stages(self) -> List[nn.Sequential]:
        return [getattr(self, f'layer{i + 1}') for i in range(self.num_stages)]

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self._stages(), x, flatten=True)
        # named one by one (no getattr loop) so that TorchScript can compile it
        x = self.layer1(x)
        if hasattr(self, 'layer2'):
            x = self.layer2(x)
        if hasattr(self, 'layer3'):
            x = self.layer3(x)
        if hasattr(self, 'layer4'):
            x = self.layer4(x)
        return x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem up to its map in ``feature_info[0]``.

        Args:
            x: Input images.

        Returns:
            The stem's map.
        """
        raise NotImplementedError

    def stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the stem's map before the first stage (an ImageNet stem's max-pool).

        Args:
            x: The stem's map.

        Returns:
            The first stage's input.
        """
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm (and activation) after the last stage, where the network has one.

        Args:
            x: The last stage's output.

        Returns:
            The unpooled features.
        """
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and the final norm where the network has one.

        Args:
            x: Input images.

        Returns:
            The unpooled features (``num_features`` channels).
        """
        return self.final_norm(self._run_stages(self.stem_pool(self.forward_stem(x))))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the maps of ``feature_info`` (stem, then each stage).

        Args:
            x: Input image tensor.
            indices: Take the last n maps if int, all if None, the listed indices if a sequence.
            norm: Apply the final norm (where the network has one) to the last stage's map when it is taken.
            stop_early: Stop after the last map taken.
            output_fmt: Shape of the intermediate maps; only ``'NCHW'``.
            intermediates_only: Return only the intermediate maps.

        Returns:
            The final features and the list of maps, or only the list of maps.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_idx = self.num_stages

        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem_pool(x)
        stages = self._stages()
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.final_norm(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if len(stages) == last_idx:
            x = self.final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the stages (and the head) that the maps at ``indices`` do not need.

        Args:
            indices: Indices of the maps to keep, as in ``forward_intermediates``.
            prune_norm: Remove the final norm too.
            prune_head: Remove the classifier.

        Returns:
            The absolute indices kept.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for i in range(max_index, self.num_stages):
            setattr(self, f'layer{i + 1}', nn.Sequential())  # empty Sequential: checkpoint_seq can still iterate it
        if (prune_norm or max_index < self.num_stages) and hasattr(self, 'bn_final'):
            self.bn_final = nn.Identity()
            self.act_final = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every residual block in training forward passes.

        Args:
            enable: On or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier.

        Args:
            name_only: Return its attribute name instead.

        Returns:
            The classifier module, or ``'fc'``.
        """
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0`` for pre-logits).

        Args:
            num_classes: Number of outputs of the new classifier.
            global_pool: Global pooling type; None keeps the current one.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.create_head(self.num_features, num_classes, global_pool, get_device_dtype(self))
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout and the classifier.

        Args:
            x: The unpooled features.
            pre_logits: Stop before the classifier.

        Returns:
            The logits, or the pooled features with ``pre_logits``.
        """
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
