"""What a run builds from its configuration: a ``*_moex`` model's hook is made with the run's moex_* keys, so the
hook is what config.yaml records."""
import pytest

from timm_moex import get_moex_hook
from timm_moex.train import ConfigError, load_config
from timm_moex.train.builders import create_model


def config(*argv):
    return load_config(['--model', 'resnet18_moex', '--img-size', '32', *argv], check_paths=False)


def test_the_moex_keys_make_a_variants_hook():
    cfg = config('--moex', '--moex-norm', 'in', '--moex-eps', '0.001', '--moex-layer', 'layer1', '--moex-impl', 'torch')
    hook = get_moex_hook(create_model(cfg, num_classes=3))
    assert (hook.norm, hook.eps, hook.layer, hook.impl) == ('in', 0.001, 'layer1', 'torch')
    assert (cfg.moex_norm, cfg.moex_eps, cfg.moex_layer) == ('in', 0.001, 'layer1')  # what config.yaml records


def test_a_variant_with_moex_off_keeps_its_hook_quiet():
    hook = get_moex_hook(create_model(config('--moex', 'false'), num_classes=3))
    assert hook is not None and not hook.warn_unarmed
    assert get_moex_hook(create_model(config('--moex'), num_classes=3)).warn_unarmed


def test_a_bad_moex_key_of_a_variant_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^resnet18_moex: .*'nope'.* \(the moex_layer / moex_norm / moex_eps keys "
                                          r"are its MoEx arguments\)"):
        config('--moex', '--moex-layer', 'nope')


def test_moex_keys_inside_model_kwargs_are_refused():
    with pytest.raises(ConfigError, match=r"model_kwargs: \['moex_norm'\] are keys of their own; give them as "
                                          r"--moex-norm"):
        config('--moex', '--model-kwargs', '{moex_norm: in}')
