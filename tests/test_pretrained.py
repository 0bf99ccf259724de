"""load_pretrained over real HTTP (a server on 127.0.0.1): parity, caching, every failure."""

import hashlib
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torchvision

from resnext_jax import pretrained
from resnext_jax.model import resnext
from resnext_jax.weights import download, registry
from tests.helpers import (ROOT, FileServer, random_images, randomized, tiny_config,
                           torch_logits)


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  """A torchvision resnext50_32x4d with random weights, saved as a .pth and served."""
  directory = tmp_path_factory.mktemp('served')
  model = randomized(torchvision.models.resnext50_32x4d(), seed=3)
  torch.save(model.state_dict(), directory / 'resnext50_random.pth')
  # The mirror test serves it under a registered file name, which fails that hash.
  shutil.copy(directory / 'resnext50_random.pth', directory / 'resnext50_32x4d-1a0047aa.pth')
  server = FileServer(str(directory))
  yield server, model, str(directory / 'resnext50_random.pth')
  server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
  return os.path.join(str(tmp_path / 'cache'), 'weights')


def _cached_files(cache):
  return sorted(os.path.relpath(os.path.join(d, f), cache)
                for d, _, files in os.walk(cache) for f in files)


@pytest.mark.slow
def test_a_url_gives_torchvisions_logits_and_then_comes_from_the_cache(served, cache):
  _, torch_model, path = served
  server = FileServer(os.path.dirname(path))  # its own server, to stop half-way
  url = f'{server.url}/resnext50_random.pth'
  digest = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  try:
    variables, info = pretrained.load_pretrained(url, sha256=digest[:8])
  finally:
    server.stop()
  assert (info.arch, info.num_classes) == ('resnext50_32x4d', 1000)  # detected
  assert info.class_names[:2] == ('tench', 'goldfish')
  images = random_images(2, 64)
  ours = resnext.create_model('resnext50_32x4d').apply(variables, images)
  np.testing.assert_allclose(ours, torch_logits(torch_model, images), atol=1e-4, rtol=1e-4)

  torch_load = torch.load
  try:  # the second call needs neither the (stopped) server nor torch
    torch.load = None
    again, _ = pretrained.load_pretrained(url)
  finally:
    torch.load = torch_load
  np.testing.assert_array_equal(again['params']['fc']['kernel'],
                                variables['params']['fc']['kernel'])
  with pytest.raises(download.DownloadError, match='refused'):
    pretrained.load_pretrained(f'{server.url}/resnext50_32x4d-1a0047aa.pth')


@pytest.mark.parametrize('case', ['wrong_hash', 'truncated', 'missing', 'refused'])
def test_each_failure_says_what_happened_and_caches_nothing(served, cache, case):
  server, _, _ = served
  port = server.url.rsplit(':', 1)[1]
  url, sha256, message = {
      'wrong_hash': (f'{server.url}/resnext50_random.pth', 'deadbeef',
                     r'has sha256 [0-9a-f]{64}, but deadbeef was expected'),
      'truncated': (f'{server.url}/truncated/resnext50_random.pth', None,
                    r'connection closed early; nothing was cached'),
      'missing': (f'{server.url}/no_such.pth', None, r'HTTP 404'),
      'refused': (server.url.replace(port, str(_closed_port())) + '/w.pth', None,
                  r'failed: .*refused'),
  }[case]
  with pytest.raises(download.DownloadError, match=message) as error:
    pretrained.load_pretrained(url, sha256=sha256)
  assert 'To place it by hand' in str(error.value) and url in str(error.value)
  assert _cached_files(cache) == []


def test_the_mirror_serves_registered_names(served, cache, monkeypatch):
  server, _, _ = served
  monkeypatch.setenv(download.MIRROR_VARIABLE, server.url + '/')
  entry = registry.lookup('resnext50_32x4d.tv2_in1k')
  assert download.mirrored(entry.url) == f'{server.url}/resnext50_32x4d-1a0047aa.pth'
  # The served file is not torchvision's: the registered hash refuses it.
  with pytest.raises(download.DownloadError,
                     match=r'resnext50_32x4d-1a0047aa.pth has sha256 .*but 1a0047aa'):
    pretrained.load_pretrained('resnext50_32x4d.tv2_in1k')
  assert _cached_files(cache) == []
  folder = os.path.dirname(served[2])  # a mirror folder serves the same way
  monkeypatch.setenv(download.MIRROR_VARIABLE, folder)
  assert download.mirrored(entry.url) == os.path.join(folder, 'resnext50_32x4d-1a0047aa.pth')
  with pytest.raises(download.DownloadError, match=r'has sha256 .*but 1a0047aa was expected'):
    pretrained.load_pretrained('resnext50_32x4d.tv2_in1k')
  assert _cached_files(cache) == []


def test_a_file_placed_in_the_cache_by_hand_is_checked_too(served, cache):
  os.makedirs(os.path.join(cache, 'downloads'))
  shutil.copy(served[2], os.path.join(cache, 'downloads', 'resnext50_32x4d-1a0047aa.pth'))
  with pytest.raises(download.DownloadError, match=r'cached .* does not have the sha256 '
                                                   r'1a0047aa'):
    pretrained.load_pretrained('resnext50_32x4d.tv2_in1k')


def test_unknown_names_suggest_registered_ones(cache):
  with pytest.raises(ValueError, match=r"Did you mean .*resnext50_32x4d.tv2_in1k.*\? Registered"):
    pretrained.load_pretrained('resnext50_32x4d.tv3_in1k')


def test_the_readme_table_is_the_registry():
  with open(os.path.join(ROOT, 'README.md')) as f:
    rows = [line.split('|')[1:-1] for line in f if line.startswith('| `resnext')
            and '_in1k` |' in line]
  table = {cells[0].strip(' `'): [c.strip() for c in cells[1:4]] for cells in rows}
  assert list(table) == list(registry.REGISTRY)
  for name, (results, sizes, sha256) in table.items():
    entry = registry.REGISTRY[name]
    assert [float(x) for x in results.split(' / ')] == [entry.top1, entry.top5]
    assert sizes == f'{entry.resize} / {entry.crop} {entry.interpolation}'
    assert sha256 == entry.sha256
    assert entry.arch in resnext.ARCHS and name.startswith(entry.arch + '.')
  assert len(set(registry.imagenet_class_names())) == 1000


@pytest.mark.slow
def test_init_from_a_url_finetunes_a_tiny_model_with_a_new_head(served, cache, tmp_path):
  from resnext_jax.training import checkpoints, trainer  # pylint: disable=g-import-not-at-top
  server, _, _ = served
  torch.manual_seed(0)
  tiny = randomized(torchvision.models.resnet.ResNet(
      torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
      num_classes=10))
  torch.save(tiny.state_dict(), os.path.join(os.path.dirname(served[2]), 'tiny.pth'))
  config = tiny_config(str(tmp_path / 'shapes'), init_from=f'{server.url}/tiny.pth',
                       num_train_steps=2, image_size=32, learning_rate=0.0, weight_decay=0.0)
  config.model = dict(stage_sizes=(1, 1, 1, 1), cardinality=4, width_per_group=4)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  trained = checkpoints.load_variables(str(tmp_path / 'run'))
  assert trained['params']['fc']['kernel'].shape == (2048, 5)  # the shapes' five classes
  np.testing.assert_allclose(  # with lr 0 the backbone is exactly the downloaded one
      trained['params']['conv1']['kernel'],
      tiny.state_dict()['conv1.weight'].numpy().transpose(2, 3, 1, 0), rtol=1e-6)


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_the_command_lists_the_registry_and_names_a_bad_entry(capsys, cache):
  assert pretrained.main([]) == 0
  listing = capsys.readouterr().out
  assert all(f'| {name} |' in listing for name in registry.REGISTRY)
  assert pretrained.main(['resnext50_32x4d.nope']) == 2
  assert 'is not a registered weights name' in capsys.readouterr().err
