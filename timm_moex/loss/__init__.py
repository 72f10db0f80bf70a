"""Losses: MoEx's interpolated loss and the bi-tempered logistic loss."""
from .bitempered import BiTemperedLogisticLoss, bi_tempered_logistic_loss, tempered_softmax
from .moex import MoExLoss
