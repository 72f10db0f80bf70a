"""Classification metrics over a whole evaluation set, reduced across processes.

Every batch's logits and targets go through ``accelerator.gather_for_metrics``, which drops the
samples that the distributed sampler duplicated to even out the last batch, so every process
ends with the metrics of exactly the evaluation set. Errors are percentages.

The sums stay on the logits' device, so an evaluation pass waits for the device once, in
``compute``, instead of once per batch.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ['ClassificationMeter', 'evaluate']


class ClassificationMeter:
    """Sums for top-1 / top-5 error, NLL and expected calibration error; ``update`` per batch, then ``compute``.

    Args:
        bins: Equal-width confidence bins of the expected calibration error; >= 1.

    Raises:
        ValueError: ``bins`` is less than 1.
    """

    def __init__(self, bins: int = 15):
        if bins < 1:
            raise ValueError(f'bins={bins}: the calibration error needs at least 1 bin')
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.count = 0
        # [correct top-1, correct top-5, NLL sum], then per bin the summed confidence and the summed top-1 hits;
        # moved to the logits' device by the first update
        self.sums = torch.zeros(3 + 2 * self.bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits: (B, K) class scores.
            target: (B,) class indices.
        """
        logits, target = logits.detach().float(), target.detach()
        if self.sums.device != logits.device:
            # float64 keeps the counts exact over any evaluation set; MPS has no float64
            self.sums = self.sums.to(logits.device, torch.float32 if logits.device.type == 'mps' else torch.float64)
        sums = self.sums
        k = min(5, logits.shape[-1])
        hit = logits.topk(k, dim=-1).indices.eq(target[:, None])
        top1 = hit[:, 0].to(sums.dtype)
        sums[0] += top1.sum()
        sums[1] += hit.any(dim=-1).to(sums.dtype).sum()
        sums[2] += F.cross_entropy(logits, target, reduction='none').to(sums.dtype).sum()
        # NaN logits (a diverged model) give NaN confidences: counted in bin 0 with confidence 0, so that the
        # bin index stays in range; the NLL, NaN, is what shows the divergence.
        conf = logits.softmax(-1).amax(-1).to(sums.dtype).nan_to_num_(nan=0.0)
        index = (conf * self.bins).long().clamp_(0, self.bins - 1)
        per_bin = sums[3:].view(2, self.bins)
        per_bin[0].index_add_(0, index, conf)
        per_bin[1].index_add_(0, index, top1)
        self.count += target.numel()

    def compute(self) -> Dict[str, float]:
        n = max(self.count, 1)
        sums = self.sums.cpu()
        conf, acc = sums[3:].view(2, self.bins)
        return {
            'loss': sums[2].item() / n,  # the NLL (cross-entropy without smoothing)
            'top1_err': 100.0 * (1.0 - sums[0].item() / n),
            'top5_err': 100.0 * (1.0 - sums[1].item() / n),
            'ece': 100.0 * (conf - acc).abs().sum().item() / n,
            'count': self.count,
        }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, channels_last: bool = False,
             meter: Optional[ClassificationMeter] = None) -> Dict[str, float]:
    """Metrics of ``model`` on ``loader``, identical on every process.

    Runs in eval mode under the accelerator's autocast and restores the model's training mode.

    Args:
        model: The classifier.
        loader: An Accelerate-prepared loader of (input, target) batches.
        accelerator: The run's Accelerator: autocast and ``gather_for_metrics``.
        channels_last: Feed channels-last inputs.
        meter: Where the sums go; None uses a fresh ``ClassificationMeter()``.

    Returns:
        ``loss`` (the NLL), ``top1_err``, ``top5_err``, ``ece`` (all %) and ``count`` (images).
    """
    meter = meter or ClassificationMeter()
    was_training = model.training
    model.eval()
    for input, target in loader:
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            output = model(input)
        output, target = accelerator.gather_for_metrics((output, target))
        meter.update(output, target)
    model.train(was_training)
    return meter.compute()
