"""A run folder is a timm model folder: local-dir: reloads it, --push-to-hub publishes it."""
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.data import create_transform, resolve_data_config
from torchvision import datasets

import train_moex
import timm_moex
from timm_moex.train import model_folder, run_folder
from timm_moex.train.checkpoint import export_weights, load_weights
from timm_moex.train import ConfigError, RunError, load_config, save_config
from timm_moex.train.data import create_transforms, load_image


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(('create_repo', repo_id, private, exist_ok))
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message=''):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(('upload_folder', repo_id, files))
        return type('CommitInfo', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/0'})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHubApi.calls = []
    monkeypatch.setattr(model_folder, 'HfApi', FakeHubApi)
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token_not_used')
    return FakeHubApi.calls


def logits_of(model, folder, transform):
    data = datasets.ImageFolder(folder, transform=transform, loader=load_image)
    batch = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        return model.eval()(batch), torch.tensor(data.targets)


@pytest.mark.slow
@pytest.mark.parametrize('extra', [
    ('--img-size', '32', '--moex', 'true'),  # the cifar recipe: resize + centre crop at 32 px
    ('--img-size', '48', '--aug-recipe', 'imagenet', '--crop-pct', '0.75', '--interpolation', 'bicubic',
     '--mean', '[0.5,0.4,0.3]', '--std', '[0.2,0.25,0.3]'),  # timm's eval transform, the run's own numbers
])
def test_run_reloads_with_local_dir_and_predicts_as_its_last_evaluation(extra, run_args, image_folder, tmp_path,
                                                                        fake_hub):
    out = tmp_path / 'run'
    results = train_moex.main(run_args('--epochs', '1', '--push-to-hub', 'someone/moex-run', *extra, out=out))
    cfg = load_config(run_args('--epochs', '1', *extra, out=tmp_path / 'unused'))

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet10t' and config['num_classes'] == 2
    assert config['label_names'] == ['a', 'b']
    pcfg = config['pretrained_cfg']
    data_config = model_folder.run_data_config(cfg)
    for key in ('mean', 'std', 'input_size', 'crop_pct', 'interpolation'):
        value = data_config[key]
        assert pcfg[key] == (pytest.approx(list(value)) if isinstance(value, tuple) else value), key
    assert 'tag' not in pcfg  # resnet10t's published tag would be a lie about these weights

    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == ['a', 'b']
    reloaded, targets = logits_of(model, image_folder / 'test', create_transform(**resolve_data_config(model=model)))

    trained = timm.create_model('resnet10t', num_classes=2)
    load_weights(trained, out / 'model.safetensors')
    expected, _ = logits_of(trained, image_folder / 'test', create_transforms(cfg)[1])  # the run's eval pipeline
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-5)
    top1_err = 100.0 * (1.0 - (reloaded.argmax(-1) == targets).float().mean().item())
    assert top1_err == pytest.approx(results['last']['top1_err'])

    # --push-to-hub sent exactly the folder's config.json and weights, and a card with the recipe and results
    (create, repo, private, exist_ok), (upload, repo2, files) = fake_hub
    assert (create, repo, upload, repo2) == ('create_repo', 'someone/moex-run', 'upload_folder', 'someone/moex-run')
    assert set(files) == set(model_folder.HUB_FILES)
    assert files['config.json'] == (out / 'config.json').read_bytes()
    assert files['model.safetensors'] == (out / 'model.safetensors').read_bytes()
    card = files['README.md'].decode()
    assert "timm.create_model('hf-hub:someone/moex-run', pretrained=True)" in card
    assert f"{results['last']['top1_err']:.2f}" in card
    recipe = yaml.safe_load(card.split('```yaml\n')[1].split('```')[0])
    assert recipe == yaml.safe_load((out / 'config.yaml').read_text())
    assert 'library_name: timm' in card
    # the local card is the same, with the local-dir usage
    assert f"'local-dir:{out}'" in (out / 'README.md').read_text()


def test_moex_variant_folder_reloads_the_variant(tmp_path):
    cfg = load_config(['--model', 'resnet18_moex', '--img-size', '32', '--output-dir', str(tmp_path / 'x')],
                      check_paths=False)
    model = timm.create_model('resnet18_moex', num_classes=3, moex_norm='in').eval()
    export_weights(model, tmp_path / 'model.safetensors')
    model_folder.write_model_folder(model, tmp_path, cfg, label_names=['x', 'y', 'z'])
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    hook = timm_moex.get_moex_hook(reloaded)
    assert hook is not None and hook.norm == 'in'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert reloaded.pretrained_cfg['label_names'] == ['x', 'y', 'z']


def test_labels_are_left_out_unless_one_per_class(tmp_path):
    cfg = load_config(['--model', 'resnet10t', '--img-size', '32', '--output-dir', str(tmp_path / 'x')],
                      check_paths=False)
    model = timm.create_model('resnet10t', num_classes=3)
    export_weights(model, tmp_path / 'model.safetensors')
    model_folder.write_model_folder(model, tmp_path, cfg, label_names=['a', 'b'])
    assert 'label_names' not in json.loads((tmp_path / 'config.json').read_text())
    assert not list(tmp_path.glob('.*.tmp'))


@pytest.mark.slow
def test_push_needs_a_finished_folder_and_reports_a_failed_upload(tmp_path, fake_hub, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        model_folder.push_model_folder(tmp_path, 'someone/x')
    cfg = load_config(['--model', 'resnet10t', '--img-size', '32', '--output-dir', str(tmp_path)], check_paths=False)
    model = timm.create_model('resnet10t', num_classes=2)
    export_weights(model, tmp_path / 'model.safetensors')
    save_config(cfg, tmp_path / 'config.yaml')
    model_folder.write_model_folder(model, tmp_path, cfg)
    assert model_folder.main([str(tmp_path), 'someone/x']) == 0
    assert 'someone/x' in capsys.readouterr().out

    def offline(self, *args, **kwargs):
        raise ConnectionError('Failed to resolve huggingface.co\nmore lines')
    monkeypatch.setattr(FakeHubApi, 'create_repo', offline)
    with pytest.raises(RunError) as err:
        run_folder.push_run(tmp_path, 'someone/x')
    message = str(err.value)
    assert '\n' not in message and 'ConnectionError' in message and str(tmp_path) in message


@pytest.mark.parametrize('value, match', [('not a repo id', 'not a Hugging Face Hub repository id'),
                                          ('a/b/c', 'not a Hugging Face Hub repository id')])
def test_push_to_hub_checks_the_repo_id(value, match, run_args, fake_hub):
    with pytest.raises(ConfigError, match=match):
        load_config(run_args('--push-to-hub', value))


def test_push_to_hub_needs_a_token_before_training(run_args, monkeypatch, tmp_path):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # no stored token either
    monkeypatch.setenv('HF_TOKEN_PATH', str(tmp_path / 'hf' / 'token'))
    with pytest.raises(ConfigError, match='no Hugging Face token'):
        load_config(run_args('--push-to-hub', 'someone/x'))
