"""Small real-format datasets that tests build themselves: ImageNet's manual-download tars."""

import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


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
