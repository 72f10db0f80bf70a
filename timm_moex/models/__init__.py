"""Models this package registers with timm; the variants come last, as they wrap the others."""
from .cifar_resnet import *  # noqa: F401,F403
from .densenet import *  # noqa: F401,F403
from .pyramidnet import *  # noqa: F401,F403
from .moex_variants import create_model, is_moex_variant, register_moex_variant
