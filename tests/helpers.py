"""What several test modules share: small real-format data the tests make themselves
(JPEGs, ImageNet's manual-download tars), PyTorch reference models with random weights,
a tiny training run of the quickstart config, in-process or as a train.py command
line, and a file server on 127.0.0.1 for the code that downloads."""

import functools
import http.server
import io
import json
import os
import socket
import sys
import tarfile
import threading

import jax
import numpy as np
import tensorflow_datasets as tfds
import torch
from etils import epath
from PIL import Image

from configs import quickstart
from resnext_jax.data import image_folder
from resnext_jax.training import default_config
from resnext_jax.training.reporting import METRICS_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(stage_sizes=(1, 1), base_planes=8, cardinality=4, width_per_group=2)


def encode_jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def imagenet_synsets() -> list[str]:
  """The 1000 synsets in tfds' label order."""
  return (tfds.core.tfds_path('datasets/imagenet2012') / 'labels.txt').read_text().split()


def write_imagenet_tars(manual_dir: str, train: dict[str, list[bytes]],
                        validation: list[bytes]) -> None:
  """ILSVRC2012_img_train.tar (a tar of per-synset tars) and ILSVRC2012_img_val.tar.

  Validation files are named ILSVRC2012_val_00000001.JPEG, ...: tfds' builder labels them
  from its own validation_labels.txt by that order.
  """
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train_tar:
    for synset, images in train.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as synset_tar:
        for i, data in enumerate(images):
          _add(synset_tar, f'{synset}_{i}.JPEG', data)
      _add(train_tar, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val_tar:
    for i, data in enumerate(validation):
      _add(val_tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', data)


def tiny_config(shapes_dir, **overrides):
  """The quickstart config, shrunk to seconds: a tiny model on 16 px images."""
  config = quickstart.get_config()
  config.model = TINY_MODEL
  config.update(data_dir=shapes_dir, image_size=16, batch_size=16, eval_batch_size=64,
                num_train_steps=6, log_every_steps=2, eval_every_steps=3,
                checkpoint_every_steps=3, learning_rate=0.1, lr_schedule='step',
                warmup_epochs=0)
  config.update(overrides)
  return config


def _image_folder(root, per_class):
  rng = np.random.default_rng(0)
  for split, count in (('train', per_class), ('validation', 4)):
    for name in ('a', 'b'):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        with open(os.path.join(root, split, name, f'{i}.jpg'), 'wb') as f:
          f.write(encode_jpeg(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)))


def stalled_image_folder(root, cache_dir, per_class=24):
  """An image folder whose first training image becomes a named pipe that nobody writes,
  after the scan found the image readable: reading it blocks, as on a hung file system."""
  _image_folder(root, per_class)
  config = tiny_config('', dataset='image_folder', data_dir=root, cache_dir=cache_dir)
  image_folder.image_folder_source(root, (config.train_split, config.eval_split), cache_dir)  # scans and caches the verdicts
  path = os.path.join(root, 'train', 'a', '0.jpg')
  os.remove(path)
  os.mkfifo(path)
  # The scan cache (keyed by path, size, mtime) says the file was checked readable.
  cache_path = image_folder.scan_cache_path(os.path.join(root, 'train'), cache_dir)
  with open(cache_path) as f:
    cache = json.load(f)
  stat = os.stat(path)
  cache['files'][path] = [stat.st_size, stat.st_mtime_ns, True]
  with open(cache_path, 'w') as f:
    json.dump(cache, f)
  return ['--config.dataset=image_folder', f'--config.data_dir={root}',
          f'--config.cache_dir={cache_dir}']


def read_metrics(workdir):
  """metrics.jsonl's records, from a local or a gs:// workdir."""
  text = epath.Path(workdir, METRICS_FILE).read_text()
  return [json.loads(line) for line in text.splitlines()]


def leaves(variables):
  return jax.tree.leaves(jax.device_get(variables))


def train_command(workdir, shapes_dir, steps):
  return [sys.executable, 'train.py', '--config=configs/quickstart.py', f'--workdir={workdir}',
          f'--config.data_dir={shapes_dir}', '--config.image_size=16',
          '--config.batch_size=16', '--config.eval_batch_size=64',
          f'--config.num_train_steps={steps}', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=1000', '--config.eval_every_steps=1000',
          '--config.lr_schedule=step', '--config.warmup_epochs=0',
          '--config.model.stage_sizes=(1,1)', '--config.model.base_planes=8',
          '--config.model.cardinality=4', '--config.model.width_per_group=2']


def config_with(**overrides):
  """The default config (the seed recipe) with some fields changed."""
  config = default_config.get_config()
  config.update(overrides)
  return config


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Random weights everywhere, including BN affine parameters and running statistics."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
  return module.eval()


def torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


class FileServer:
  """A static file server on 127.0.0.1 in a thread; `/truncated/NAME` sends the first half
  of NAME under the full Content-Length, then closes the connection."""

  def __init__(self, directory):
    handler = functools.partial(_FileHandler, directory=directory)
    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()

  def stop(self):
    self._httpd.shutdown()
    self._httpd.server_close()


class _FileHandler(http.server.SimpleHTTPRequestHandler):

  def do_GET(self):  # pylint: disable=invalid-name
    if not self.path.startswith('/truncated/'):
      return super().do_GET()
    with open(os.path.join(self.directory, self.path[len('/truncated/'):]), 'rb') as f:
      data = f.read()
    self.send_response(200)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data[:len(data) // 2])
    self.wfile.flush()
    self.close_connection = True
    self.connection.shutdown(socket.SHUT_RDWR)

  def log_message(self, *args):  # keep the test output quiet
    pass
