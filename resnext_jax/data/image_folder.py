"""The user's own images as a source: ROOT/<split>/<class>/<image>, class names from the
folders. Each split is scanned once; which files decode is cached as JSON, so later runs
only list the folders."""

import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf

from resnext_jax import storage
from resnext_jax.data.dataset import DatasetInfo, Source, Split, numpy_load
from resnext_jax.data.preprocessing import decode_image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


def image_folder_source(root: str, splits: tuple[str, ...], cache_dir: str) -> Source:
  """Scans and validates ROOT/<split>/<class>/<image> for each split; classes must agree."""
  if storage.is_remote(root):
    raise ValueError(
        f'config.data_dir={root}: image folders are read from a local or mounted file system '
        '(e.g. gcsfuse for a bucket). For data in a bucket, prepare it as a tfds dataset, '
        'which is read from gs:// directly.')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'Image folder {root} does not exist. config.data_dir must be a folder holding '
        '<split>/<class>/<image>, e.g. ROOT/train/cat/1.jpg and ROOT/validation/cat/2.jpg.')
  class_names = {split: _class_folders(root, split) for split in splits}
  names = class_names[splits[0]]
  for split in splits[1:]:
    if class_names[split] != names:
      lines = []
      for a, b in ((splits[0], split), (split, splits[0])):
        for c in sorted(set(class_names[a]) - set(class_names[b])):
          lines.append(f'  class {c!r} is in {os.path.join(root, a)} but '
                       f'{os.path.join(root, b, c)} does not exist')
      raise ValueError('The splits of image folder ' + root + ' have different classes:\n'
                       + '\n'.join(lines) + '\nEvery split needs a folder for every class.')

  split_data = {}
  for split in splits:
    files, labels = _scan_split(os.path.join(root, split), names, cache_dir)
    paths = np.array(files, dtype=object)
    labels = np.array(labels, dtype=np.int32)

    def read(indices, paths=paths, labels=labels):
      records = np.empty(len(indices), dtype=object)
      for j, i in enumerate(indices):
        with open(paths[i], 'rb') as f:
          records[j] = f.read()
      return records, labels[indices]

    split_data[split] = Split(len(paths), numpy_load(read))
  return Source(
      DatasetInfo(num_classes=len(names),
                  num_train_examples=split_data[splits[0]].num_examples,
                  num_eval_examples=split_data[splits[1]].num_examples,
                  class_names=names),
      split_data)


def _class_folders(root: str, split: str) -> tuple[str, ...]:
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != '.')
    raise FileNotFoundError(
        f'Split folder {split_dir} does not exist (folders in {root}: {found or "none"}). '
        'Create it with one subfolder per class, or set config.train_split / '
        'config.eval_split to existing ones.')
  names = tuple(sorted(e.name for e in os.scandir(split_dir)
                       if e.is_dir() and e.name[0] != '.'))
  if not names:
    raise ValueError(f'{split_dir} has no class folders. Put each image in '
                     f'{split_dir}/<class name>/, one folder per class.')
  return names


def _scan_split(split_dir: str, class_names: tuple[str, ...],
                cache_dir: str) -> tuple[list[str], list[int]]:
  """Readable images of one split and their labels; unreadable ones reported and skipped.

  Every image is decoded once, the first time it is seen. The verdicts are cached (keyed by
  path, size and modification time) in `cache_dir`, so later runs only list the folder.
  """
  candidates = []  # (path, label, size, mtime)
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    before = len(candidates)
    for parent, dirs, files in os.walk(class_dir, followlinks=True):
      dirs[:] = sorted(d for d in dirs if d[0] != '.')
      for file in sorted(files):
        if file[0] != '.' and file.lower().endswith(IMAGE_EXTENSIONS):
          path = os.path.join(parent, file)
          stat = os.stat(path)
          candidates.append((path, label, stat.st_size, stat.st_mtime_ns))
    if len(candidates) == before:
      raise ValueError(f'Class folder {class_dir} holds no images '
                       f'({", ".join(IMAGE_EXTENSIONS)}). Add some, or remove the class from '
                       'every split.')

  cache_path = scan_cache_path(split_dir, cache_dir)
  cache = _read_json(cache_path).get('files', {})
  verdicts = {}
  unchecked = []
  for path, _, size, mtime in candidates:
    cached = cache.get(path)
    if cached is not None and cached[:2] == [size, mtime]:
      verdicts[path] = cached[2]
    else:
      unchecked.append(path)
  if unchecked:
    readable = _readable(unchecked, split_dir)
    verdicts.update((p, p in readable) for p in unchecked)
    _write_json(cache_path, {'split_dir': split_dir, 'files': {
        p: [size, mtime, verdicts[p]] for p, _, size, mtime in candidates}})

  bad = [p for p, *_ in candidates if not verdicts[p]]
  if bad:
    shown = '\n  '.join(bad[:20]) + (f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else '')
    logging.warning('Skipping %d unreadable image(s) in %s (verdicts cached in %s):\n  %s',
                    len(bad), split_dir, cache_path, shown)
  kept = [(p, label) for p, label, *_ in candidates if verdicts[p]]
  missing = set(range(len(class_names))) - {label for _, label in kept}
  if missing:
    folders = ', '.join(os.path.join(split_dir, class_names[i]) for i in sorted(missing))
    raise ValueError(f'No readable image in {folders}. Replace the unreadable files listed above.')
  return [p for p, _ in kept], [label for _, label in kept]


def scan_cache_path(split_dir: str, cache_dir: str) -> str:
  """Where the verdicts of `split_dir`'s scan are cached: JSON `{"split_dir", "files":
  {path: [size, mtime_ns, readable]}}`."""
  key = hashlib.sha1(split_dir.encode()).hexdigest()[:16]
  return os.path.join(cache_dir, 'image_folder', f'{key}.json')


def _readable(paths: list[str], where: str) -> set[str]:
  """The paths that TF reads and decodes without error, decoded in parallel."""
  logging.info('Checking %d new or changed image(s) in %s ...', len(paths), where)
  ds = tf.data.Dataset.from_tensor_slices(paths)
  ds = ds.map(lambda p: (p, tf.shape(decode_image(tf.io.read_file(p)))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  readable = set()
  last_log = time.monotonic()
  for path, _ in ds.ignore_errors(log_warning=False).as_numpy_iterator():
    readable.add(path.decode())
    if time.monotonic() - last_log > 30:
      logging.info('... %d / %d checked', len(readable), len(paths))
      last_log = time.monotonic()
  return readable


def _read_json(path: str) -> dict[str, Any]:
  try:
    return json.loads(storage.read_text(path) or '{}')
  except ValueError:
    return {}


def _write_json(path: str, data: dict[str, Any]) -> None:
  """Writes the whole file at once (config.cache_dir may be a bucket), so that concurrent
  processes never read half of it."""
  storage.write_text(path, json.dumps(data))
