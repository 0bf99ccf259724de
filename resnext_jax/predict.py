"""Classifies images with pretrained or trained weights.

    python -m resnext_jax.predict --weights=resnext50_32x4d.tv2_in1k cat.jpg photos/
    python -m resnext_jax.predict --weights=runs/quickstart --json --top_k=3 images/

`--weights` is anything `load_pretrained` takes: a registered name, a URL, a PyTorch
file, a converter output or a training workdir. Images (JPEG, PNG, BMP, GIF; grayscale or
colour; folders recursively) get the weights' own eval preprocessing (resize, crop and
interpolation) and are classified in batches on JAX's default device (a GPU or TPU where
there is one). Each image prints its path and the top-k class
names with probabilities, or with `--json` one object per line:
`{"path": ..., "top_k": [{"label": ..., "prob": ...}, ...]}`. Unreadable images are named
on stderr and skipped; the exit status is 1 if none could be read.

In Python: `Predictor.from_pretrained(source).classify(paths)`.
"""

import argparse
import json
import os
import re
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.data.image_folder import IMAGE_EXTENSIONS
from resnext_jax.data.preprocessing import default_resize_size
from resnext_jax.model.resnext import ResNeXt, normalize_images
from resnext_jax.pretrained import PretrainedInfo, load_pretrained

# Images read and decoded at once by the command line (bounds its memory).
_CHUNK = 256


class Predictor:
  """Top-k classes of images for one set of weights: preprocessing, model and names."""

  def __init__(self, model: ResNeXt, variables: dict, info: PretrainedInfo, *,
               batch_size: int = 32):
    self.model = model
    self.variables = jax.device_put(variables)
    self.info = info
    self.batch_size = batch_size
    self.image_size = info.crop or 224
    self.resize_size = info.resize or default_resize_size(self.image_size)
    self.class_names = info.class_names or tuple(
        f'class {i}' for i in range(info.num_classes))
    self._probabilities = jax.jit(lambda v, x: jax.nn.softmax(
        model.apply(v, normalize_images(x, model.dtype), train=False), axis=-1))

  @classmethod
  def from_pretrained(cls, source: str, *, ema: bool = False, **kwargs) -> 'Predictor':
    """A predictor for anything `load_pretrained` takes (`ema`: a training workdir's
    moving average of the weights; `kwargs`: batch_size)."""
    variables, info = load_pretrained(source, ema=ema)
    return cls(info.create_model(), variables, info, **kwargs)

  def preprocess(self, encoded: bytes) -> np.ndarray:
    """Encoded image bytes -> the uint8 [crop, crop, 3] input of the weights' eval."""
    from resnext_jax.data import preprocessing  # pylint: disable=g-import-not-at-top
    return preprocessing.preprocess_eval(
        encoded, image_size=self.image_size, resize_size=self.resize_size,
        interpolation=self.info.interpolation).numpy()

  def load_images(self, paths: Sequence[str]) -> tuple[list[str], list[np.ndarray], dict]:
    """(paths read, their preprocessed images, {unreadable path: why})."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    read, images, failed = [], [], {}
    for path in paths:
      try:
        with open(path, 'rb') as f:
          images.append(self.preprocess(f.read()))
        read.append(path)
      except (OSError, tf.errors.OpError) as e:
        message = (getattr(e, 'message', None) or str(e)).splitlines()[0]
        # TF wraps the reason in its op's names: "{{function_node ...}} REASON [Op:...]".
        failed[path] = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:\w+\]', '', message)
    return read, images, failed

  def classify(self, paths: Sequence[str],
               top_k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """{path: top-k (class name, probability)} for the image files that can be read."""
    read, images, _ = self.load_images(paths)
    return dict(zip(read, self.predict(images, top_k)))

  def predict(self, images: Sequence[np.ndarray],
              top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each preprocessed uint8 image, its top-k (class name, probability) pairs."""
    top_k = min(top_k, len(self.class_names))
    size = min(self.batch_size, len(images))  # one compiled shape for every batch
    results = []
    for start in range(0, len(images), size):
      batch = np.stack(images[start:start + size])
      count = len(batch)
      if count < size:
        padding = np.zeros((size - count,) + batch.shape[1:], batch.dtype)
        batch = np.concatenate([batch, padding])
      probabilities = np.asarray(self._probabilities(self.variables, jnp.asarray(batch)))
      for row in probabilities[:count]:
        best = np.argsort(-row)[:top_k]
        results.append([(self.class_names[i], float(row[i])) for i in best])
    return results


def image_paths(inputs: Iterable[str]) -> list[str]:
  """The image files named, and those under the folders named (recursively, sorted)."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      for parent, dirs, files in os.walk(item):
        dirs.sort()
        paths.extend(os.path.join(parent, f) for f in sorted(files)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
    else:
      paths.append(item)
  return paths


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnext_jax.predict',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--weights', required=True,
                      help='registered name, URL, PyTorch file, converter output, workdir')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--json', action='store_true', help='one JSON object per line')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--ema', action='store_true',
                      help="a training workdir's moving average of the weights "
                           '(a run with config.ema_decay > 0)')
  parser.add_argument('images', nargs='+', help='image files or folders')
  args = parser.parse_args(argv)
  paths = image_paths(args.images)
  if not paths:
    print(f'error: no images ({", ".join(IMAGE_EXTENSIONS)}) in {" ".join(args.images)}',
          file=sys.stderr)
    return 1
  try:
    predictor = Predictor.from_pretrained(args.weights, ema=args.ema,
                                          batch_size=args.batch_size)
  except (ValueError, RuntimeError) as e:  # names, downloads, conversions, checkpoints
    print(f'error: {e}', file=sys.stderr)
    return 2
  classified = 0
  for start in range(0, len(paths), _CHUNK):
    read, images, failed = predictor.load_images(paths[start:start + _CHUNK])
    for path, why in failed.items():
      print(f'skipped {path}: not a readable image ({why})', file=sys.stderr)
    for path, top in zip(read, predictor.predict(images, args.top_k) if read else []):
      if args.json:
        print(json.dumps({'path': path, 'top_k': [{'label': label, 'prob': round(prob, 6)}
                                                  for label, prob in top]}))
      else:
        print(path + ': ' + ', '.join(f'{label} {prob:.3f}' for label, prob in top))
    classified += len(read)
  if not classified:
    print('error: none of the images could be read', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
