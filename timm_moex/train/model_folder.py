"""A finished run folder as a timm model folder, and its publication on the Hugging Face Hub.

At the end of a run, train_moex.py writes beside ``model.safetensors`` what timm's ``local-dir:``
and ``hf-hub:`` loaders read: ``config.json`` (written by timm's ``save_config_for_hf``: the
architecture, ``num_classes``, the label names, the reconstruction arguments and a
``pretrained_cfg`` holding the run's mean, std, input size, crop fraction and interpolation) and
a model card, ``README.md`` (timm's ``generate_readme``, plus the recipe and the results). Then::

    import timm, timm_moex  # timm_moex registers the package's model names
    model = timm.create_model('local-dir:output/quickstart', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

gives the trained model and its evaluation transform. :func:`push_model_folder` uploads the
same three files to a Hub repository, after which ``'hf-hub:owner/name'`` loads the model.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn
import yaml
from huggingface_hub import HfApi
from timm import __version__ as timm_version
from timm.data import DEFAULT_CROP_PCT
from timm.models._hub import generate_readme, save_config_for_hf  # timm's writers of config.json, the card
from timm.models._registry import split_model_name_tag

from .config import TrainConfig
from .files import atomic_path, atomic_write_text
from .data import resolve_data_defaults

__all__ = ['run_data_config', 'write_model_folder', 'model_card', 'push_model_folder', 'HUB_FILES']

# What a Hub repository of a run holds: everything timm's hf-hub: loader reads, and the model card.
HUB_FILES = ('config.json', 'model.safetensors', 'README.md')

# pretrained_cfg fields of timm's published weights that save_config_for_hf keeps.
_SOURCE_FIELDS = ('tag', 'license', 'origin_url', 'paper_ids', 'paper_name', 'notes')

_CITATION = """@inproceedings{li2021moex,
  title={On Feature Normalization and Data Augmentation},
  author={Li, Boyi and Wu, Felix and Lim, Ser-Nam and Belongie, Serge and Weinberger, Kilian Q.},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2021}
}"""


def run_data_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The evaluation preprocessing of a run in timm's data-config terms.

    The imagenet recipe evaluates with timm's ``create_transform`` (resize to
    ``img_size / crop_pct``, centre crop); the cifar and none recipes resize the shorter side to
    ``img_size`` (bilinear) and centre-crop, which is ``crop_pct = 1``.

    Args:
        cfg: The run's configuration.

    Returns:
        ``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation``.
    """
    img_size, mean, std, recipe = resolve_data_defaults(cfg)
    if recipe == 'imagenet':
        crop_pct, interpolation = cfg.crop_pct or DEFAULT_CROP_PCT, cfg.interpolation
    else:
        crop_pct, interpolation = 1.0, 'bilinear'
    return dict(input_size=(3, img_size, img_size), mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
                crop_mode='center', interpolation=interpolation)


def write_model_folder(
        model: nn.Module,
        folder: os.PathLike,
        cfg: TrainConfig,
        label_names: Optional[Sequence[str]] = None,
        results: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``config.json`` and ``README.md`` into a run folder that holds ``model.safetensors``.

    Both are written under temporary names, then renamed.

    Args:
        model: The trained model, unwrapped (the weights of ``model.safetensors``).
        folder: The run folder.
        cfg: The run's configuration (architecture name, preprocessing, recipe).
        label_names: The class names, index by index; left out unless there is one per class.
        results: The run's results (results.json), for the model card.

    Returns:
        The path of config.json.
    """
    folder = Path(folder)
    model_config: Dict[str, Any] = dict(pretrained_cfg=dict(architecture=split_model_name_tag(cfg.model)[0]))
    if label_names is not None and len(label_names) == model.num_classes:
        model_config['label_names'] = [str(name) for name in label_names]
    path = folder / 'config.json'
    with atomic_path(path) as tmp:
        save_config_for_hf(model, tmp, model_config=model_config, data_config=run_data_config(cfg))
        config = json.loads(tmp.read_text())
        for key in _SOURCE_FIELDS:  # they describe the weights the architecture was published with, not these
            config['pretrained_cfg'].pop(key, None)
        tmp.write_text(json.dumps(config, indent=2))
    atomic_write_text(folder / 'README.md', model_card(folder, cfg=cfg, results=results))
    return path


def model_card(
        folder: os.PathLike,
        repo_id: Optional[str] = None,
        cfg: Optional[TrainConfig] = None,
        results: Optional[Dict[str, Any]] = None,
) -> str:
    """The model card of a run folder: timm's card (details, usage, citation), the recipe and the results.

    Args:
        folder: The run folder; its ``config.json``, and ``config.yaml`` / ``results.json`` when
            ``cfg`` / ``results`` are not given.
        repo_id: The Hub repository, for the usage example; default: the local folder.
        cfg: The run's configuration (the recipe).
        results: The run's results.

    Returns:
        The card, Markdown with timm's YAML header.
    """
    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text())
    recipe = cfg.to_dict() if cfg is not None else _read_yaml(folder / 'config.yaml')
    if results is None and (folder / 'results.json').is_file():
        results = json.loads((folder / 'results.json').read_text())
    pcfg = config['pretrained_cfg']
    arch = config['architecture']
    details: Dict[str, Any] = {
        'Model Type': 'Image classification',
        'Architecture': arch,
        'Classes': config['num_classes'],
        'Image size': f"{pcfg['input_size'][-2]} x {pcfg['input_size'][-1]}",
    }
    if recipe:
        details['Dataset'] = recipe.get('dataset')
        details['Training'] = ', '.join(f'{k}={recipe[k]}' for k in ('epochs', 'batch_size', 'opt', 'lr', 'sched')
                                        if k in recipe)
        if recipe.get('moex') or arch.endswith('_moex'):
            details['MoEx'] = ', '.join(f'{k}={recipe[k]}' for k in ('moex_norm', 'moex_lam', 'moex_prob', 'moex_layer')
                                        if k in recipe)
        else:
            details['MoEx'] = 'off (baseline)'
    source = f'hf-hub:{repo_id}' if repo_id else f'local-dir:{folder}'
    usage = ('```python\nimport timm\nimport timm_moex  # registers this package\'s model names\n\n'
             f"model = timm.create_model('{source}', pretrained=True).eval()\n"
             'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n```\n')
    card = dict(
        tags=['image-classification', 'timm', 'moex'],
        description=f'A {arch} trained with timm-moex (Moment Exchange, Li et al., CVPR 2021) on '
                    f'{details.get("Dataset", "its dataset")}.',
        details=details, usage=usage, citation=_CITATION)
    text = generate_readme(card, repo_id.split('/')[-1] if repo_id else folder.name)
    if results:
        text += '\n## Results\n\n| epoch | top-1 err (%) | top-5 err (%) |\n|---|---|---|\n'
        for name in ('last', 'best'):
            row = results.get(name) or {}
            if 'top1_err' in row:
                top5 = row.get('top5_err', float('nan'))
                text += f"| {name}: {row.get('epoch')} | {row['top1_err']:.2f} | {top5:.2f} |\n"
        if results.get('note'):
            text += f"\n{results['note']}.\n"
    if recipe:
        text += '\n## Recipe\n\nThe complete configuration of the run (`train_moex.py --config` reads it):\n\n'
        text += '```yaml\n' + yaml.safe_dump(recipe, sort_keys=False) + '```\n'
    return text


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def push_model_folder(folder: os.PathLike, repo_id: str, private: bool = False,
                      commit_message: str = 'Add model trained with timm-moex') -> Any:
    """Upload a run folder's ``config.json``, ``model.safetensors`` and ``README.md`` to the Hub.

    The card's usage example is rewritten for the repository. Needs a network and a token.

    Args:
        folder: A run folder written by :func:`write_model_folder`.
        repo_id: ``owner/name``; the repository is created when it does not exist.
        private: Create the repository as private.
        commit_message: The commit message.

    Returns:
        huggingface_hub's commit information.

    Raises:
        FileNotFoundError: The folder lacks ``config.json`` or ``model.safetensors``.
    """
    folder = Path(folder)
    missing = [name for name in HUB_FILES[:2] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} is not a finished run folder: {", ".join(missing)} missing')
    api = HfApi(library_name='timm', library_version=timm_version)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        for name in HUB_FILES[:2]:
            shutil.copyfile(folder / name, staging / name)
        (staging / 'README.md').write_text(model_card(folder, repo_id=repo_id), encoding='utf-8')
        return api.upload_folder(repo_id=repo_id, folder_path=str(staging), commit_message=commit_message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m timm_moex.train.model_folder RUN_DIR OWNER/NAME [--private]``: publish a finished run folder.

    Args:
        argv: The arguments (default: the command line).

    Returns:
        The exit code: 0 once pushed; a missing folder or file exits 2 through the parser.
    """
    parser = argparse.ArgumentParser(prog='python -m timm_moex.train.model_folder',
                                     description='Publish a finished run folder on the Hugging Face Hub.')
    parser.add_argument('folder', help='a finished run folder (config.json, model.safetensors)')
    parser.add_argument('repo_id', help='the Hugging Face Hub repository, owner/name')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    args = parser.parse_args(argv)
    try:
        info = push_model_folder(args.folder, args.repo_id, private=args.private)
    except FileNotFoundError as e:
        parser.exit(2, f'{parser.prog}: {e}\n')
    print(f'pushed {args.folder} to {getattr(info, "commit_url", args.repo_id)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
