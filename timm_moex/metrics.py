"""Classification metrics over a whole evaluation set, reduced across processes.

Every batch's logits and targets go through ``accelerator.gather_for_metrics``, which drops the
samples that the distributed sampler duplicated to even out the last batch, so every process
ends with the metrics of exactly the evaluation set. Errors are percentages.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ['ClassificationMeter', 'evaluate']


class ClassificationMeter:
    """Sums for top-1 / top-5 error, NLL and expected calibration error (``bins`` equal-width bins)."""

    def __init__(self, bins: int = 15):
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.correct1 = 0.0
        self.correct5 = 0.0
        self.nll_sum = 0.0
        self.bin_count = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_acc = torch.zeros(self.bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = logits.detach().float().cpu(), target.detach().cpu()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk.eq(target[:, None])
        self.correct1 += hit[:, 0].sum().item()
        self.correct5 += hit.any(dim=-1).sum().item()
        self.nll_sum += F.cross_entropy(logits, target, reduction='sum').item()
        conf = logits.softmax(-1).max(-1).values.double()
        index = (conf * self.bins).long().clamp_(max=self.bins - 1)
        self.bin_count += torch.bincount(index, minlength=self.bins).double()
        self.bin_conf += torch.bincount(index, weights=conf, minlength=self.bins)
        self.bin_acc += torch.bincount(index, weights=hit[:, 0].double(), minlength=self.bins)
        self.count += target.numel()

    def compute(self) -> Dict[str, float]:
        n = max(self.count, 1)
        ece = (self.bin_conf - self.bin_acc).abs().sum().item() / n
        return {
            'loss': self.nll_sum / n,  # the NLL (cross-entropy without smoothing)
            'top1_err': 100.0 * (1.0 - self.correct1 / n),
            'top5_err': 100.0 * (1.0 - self.correct5 / n),
            'ece': 100.0 * ece,
            'count': self.count,
        }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, channels_last: bool = False,
             meter: Optional[ClassificationMeter] = None) -> Dict[str, float]:
    """Metrics of ``model`` on ``loader`` (an Accelerate-prepared loader), identical on every process."""
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
