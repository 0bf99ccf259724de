"""The built-in 'shapes' dataset: a small image classification task that needs no download.

Five classes of filled shapes (circle, cross, square, star, triangle), each drawn light, in a
random colour, size, position and rotation, on a dark background of another random colour
with a random gradient and pixel noise; 64x64 RGB JPEGs. 600 training and 100 validation
images per class (3,000 / 500). The shape alone decides the class; colour, position, size and
rotation are nuisances, so a model has to learn form. A tiny ResNeXt (one block per stage,
base_planes 16, cardinality 4) trained at 32 px with the standard augmentation reaches 100%
validation top-1 in about two minutes on a 2-core CPU.

The images are generated deterministically (fixed seeds: the same bytes on every machine with
the same Pillow) into the image-folder layout `ROOT/<split>/<class>/<image>.jpg` on first use,
in a few seconds, so that the quickstart and the tests go through exactly the code a user's
own folder goes through. Shapes are large and near the centre, so even the smallest random
crop (8% of the area) usually keeps enough of the shape to tell it.
"""

import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

NAME = 'shapes'
CLASS_NAMES = ('circle', 'cross', 'square', 'star', 'triangle')
IMAGE_SIZE = 64
# Images per class in each split.
SPLIT_SIZES = {'train': 600, 'validation': 100}

# Bump when the generator changes, so that stale copies are regenerated, not reused.
_VERSION = 2
_MARKER = '.shapes_dataset.json'
_SEEDS = {'train': 0, 'validation': 1}


def default_dir() -> str:
  """Where the dataset lives when `config.data_dir` is empty."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'resnext_jax', f'{NAME}-v{_VERSION}')


def ensure_generated(root: str) -> str:
  """Generates the dataset into `root` unless a complete copy is already there; returns root.

  Generation writes into a temporary sibling folder and renames it into place, so an
  interrupted run leaves nothing half-written, and processes racing on one machine agree.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if _is_complete(root):
    return root
  if os.path.exists(root) and os.listdir(root):
    raise FileExistsError(
        f'{root} is not empty but holds no complete {NAME!r} dataset (no {_MARKER} of version '
        f'{_VERSION}). Point config.data_dir at an empty or missing folder (or leave it empty '
        f'for {default_dir()}), or delete {root} to regenerate it there.')
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(root)}.tmp-', dir=parent)
  try:
    generate(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp made it private; the data is not.
    if os.path.isdir(root):
      os.rmdir(root)  # Empty (checked above); rename cannot replace it otherwise.
    os.rename(tmp, root)
  except OSError:
    if not _is_complete(root):  # Not just another process finishing first: a real failure.
      raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return root


def generate(root: str) -> None:
  """Writes every split into `root` (which must exist) and marks it complete."""
  for split, per_class in SPLIT_SIZES.items():
    rng = np.random.default_rng([_VERSION, _SEEDS[split]])
    for name in CLASS_NAMES:
      os.makedirs(os.path.join(root, split, name))
    # Classes interleaved, so that every class sees the same spread of random draws.
    for i in range(per_class):
      for name in CLASS_NAMES:
        image = Image.fromarray(draw_example(name, rng))
        image.save(os.path.join(root, split, name, f'{name}_{i:04d}.jpg'), quality=90)
  with open(os.path.join(root, _MARKER), 'w') as f:
    json.dump({'name': NAME, 'version': _VERSION, 'splits': SPLIT_SIZES}, f)


def draw_example(name: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
  """One `size` x `size` x 3 uint8 image of the shape `name`."""
  # A light shape on a dark background, both of random colour.
  background = rng.uniform(0, 110, 3)
  foreground = rng.uniform(150, 255, 3)

  # Background: its colour plus a linear gradient in a random direction.
  angle = rng.uniform(0, 2 * math.pi)
  ramp = np.linspace(-1, 1, size)
  gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
  pixels = background + rng.uniform(10, 40) * gradient[..., None]

  # The shape: its circumscribed radius and centre, kept away from the borders.
  radius = rng.uniform(0.26, 0.38) * size
  center = size / 2 + rng.uniform(-1, 1, 2) * 0.1 * size
  mask = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(mask)
  if name == 'circle':
    r = 0.85 * radius  # About the area of the other shapes.
    draw.ellipse([center[0] - r, center[1] - r, center[0] + r, center[1] + r], fill=255)
  else:
    draw.polygon(_polygon(name, center, radius, rng.uniform(0, 2 * math.pi)), fill=255)
  inside = (np.asarray(mask) > 0)[..., None]
  pixels = np.where(inside, foreground, pixels)

  pixels = pixels + rng.normal(0, 12, pixels.shape)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _polygon(name: str, center: np.ndarray, radius: float,
             rotation: float) -> list[tuple[float, float]]:
  """Vertices of a rotated square, triangle, star or cross of circumscribed `radius`."""
  def regular(count, radii):
    return [(r * math.cos(2 * math.pi * k / count), r * math.sin(2 * math.pi * k / count))
            for k, r in zip(range(count), radii)]
  if name == 'square':
    points = regular(4, [radius] * 4)
  elif name == 'triangle':
    points = regular(3, [radius] * 3)
  elif name == 'star':
    points = regular(10, [radius, 0.45 * radius] * 5)
  elif name == 'cross':
    # A plus sign whose arms are two thirds of the radius thick.
    a, h = radius / math.sqrt(1 + 1 / 9), radius / math.sqrt(1 + 1 / 9) / 3
    points = [(h, a), (h, h), (a, h), (a, -h), (h, -h), (h, -a),
              (-h, -a), (-h, -h), (-a, -h), (-a, h), (-h, h), (-h, a)]
  else:
    raise ValueError(f'Unknown shape {name!r}; expected one of {CLASS_NAMES}.')
  cos, sin = math.cos(rotation), math.sin(rotation)
  return [(center[0] + x * cos - y * sin, center[1] + x * sin + y * cos) for x, y in points]


def _is_complete(root: str) -> bool:
  try:
    with open(os.path.join(root, _MARKER)) as f:
      return json.load(f).get('version') == _VERSION
  except (OSError, ValueError):
    return False
