"""Training tasks (timm ``ClassificationTask``\\ s): MoEx, SnapMix and AutoMix, each composable with MoEx."""
from .automix import AutoMix, AutoMixTask, MixBlock, mask_area_loss
from .moex import MoExClassificationTask
from .moex_mixing import MOEX_RECIPES, PAIRINGS, MoExMixing, draw_pairing
from .snapmix import SnapMixTask, snapmix_boxes, snapmix_weights
