"""Forward hooks that change a layer's feature moments: MoEx at the stem, MixStyle and DSU in the stages."""
from .layers import STEM_LAYERS, feature_wrapper_layer, resolve_moex_layer
from .moex import MoExHook, attach_moex, convert_sync_batchnorm, get_moex_hook, reattach_moex, strip_moex
from .style import (MIXSTYLE_MIXES, DSUHook, MixStyleHook, StyleHook, attach_dsu, attach_mixstyle, dsu_layers,
                    get_dsu_hook, get_mixstyle_hook, mixstyle_layers)
