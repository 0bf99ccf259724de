"""tfds datasets as a source: prepared on first use into array_record files, read by
index (tfds' random-access data source, raw serialized records)."""

import os

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax import storage
from resnext_jax.data.dataset import DatasetInfo, Source, Split

# The files each manual-download tfds dataset needs in `config.manual_dir`.
MANUAL_FILES = {'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')}


def tfds_source(name: str, data_dir: str, manual_dir: str, splits: tuple[str, ...]) -> Source:
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    _prepare_tfds(builder, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir or None)
  info = builder.info
  if not info.supervised_keys or len(info.supervised_keys) != 2:
    raise ValueError(f'tfds dataset {name!r} has no (image, label) supervised keys; it is not '
                     'an image classification dataset.')
  image_key, label_key = info.supervised_keys
  label_feature = info.features[label_key]
  image_spec = info.features[image_key].get_serialized_info()
  if not isinstance(label_feature, tfds.features.ClassLabel) or image_spec.shape != ():
    raise ValueError(f'tfds dataset {name!r} does not store one encoded image ({image_key!r}) '
                     f'and one class label ({label_key!r}) per example.')
  parse_spec = {image_key: tf.io.FixedLenFeature([], tf.string),
                label_key: tf.io.FixedLenFeature([], tf.int64)}

  def split_of(split: str) -> Split:
    if split.split('[')[0] not in info.splits:
      raise ValueError(f'tfds dataset {name!r} in {builder.data_dir} has no split {split!r}; '
                       f'it has {sorted(info.splits)}. Set config.train_split / '
                       'config.eval_split accordingly.')
    try:
      records = builder.as_data_source(
          split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError as e:
      raise ValueError(
          f'{name!r} is prepared in {builder.data_dir} as {info.file_format.value} only, which '
          'cannot be read by index. Convert it once with `tfds convert_format '
          f'--dataset_version_dir={builder.data_dir} --out_file_format=array_record`.') from e

    def read(indices):
      return np.array(records.__getitems__(indices.tolist()), dtype=object)

    def load(indices):
      serialized = tf.numpy_function(read, [indices], tf.string, stateful=False)
      parsed = tf.io.parse_example(tf.ensure_shape(serialized, indices.shape), parse_spec)
      return parsed[image_key], tf.cast(parsed[label_key], tf.int32)

    if not len(records):
      raise ValueError(f'Split {split!r} of tfds dataset {name!r} in {builder.data_dir} is empty.')
    return Split(len(records), load)

  split_data = {s: split_of(s) for s in splits}
  return Source(
      DatasetInfo(num_classes=label_feature.num_classes,
                  num_train_examples=split_data[splits[0]].num_examples,
                  num_eval_examples=split_data[splits[1]].num_examples,
                  class_names=tuple(label_feature.names)),
      split_data)


def _prepare_tfds(builder, manual_dir: str) -> None:
  """Runs tfds' own builder into array_record files, from `manual_dir` if it needs one."""
  name = builder.name
  how = (f'`tfds build {name} --data_dir={builder.data_dir_root} --manual_dir=<folder> '
         '--file_format=array_record`')
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if instructions:
    needed = MANUAL_FILES.get(name, ())
    missing = [f for f in needed if not os.path.isfile(os.path.join(manual_dir, f))]
    if not manual_dir or not os.path.isdir(manual_dir) or missing:
      files = ', '.join(needed) or 'the files below'
      raise FileNotFoundError(
          f'tfds dataset {name!r} is not prepared in {builder.data_dir_root}, and it must be '
          f'prepared from files you download yourself: {files}. Put them in one folder and set '
          'config.manual_dir to it; the dataset is then prepared on first use (hours for '
          f'ImageNet), or beforehand with {how}.'
          + (f' Missing in {manual_dir}: {", ".join(missing)}.' if manual_dir else '')
          + f'\ntfds says:\n{instructions}')
  if storage.is_remote(builder.data_dir_root):
    raise ValueError(
        f'tfds dataset {name!r} is not prepared in {builder.data_dir_root}, and it cannot be '
        'prepared there: array_record files are written to local disk only. Prepare it on '
        f'a local disk ({how} with a local --data_dir), then copy the folder up '
        f'(`gcloud storage cp -r LOCAL_DATA_DIR/{name} {builder.data_dir_root}/`).')
  if jax.process_count() > 1:
    raise RuntimeError(
        f'tfds dataset {name!r} is not prepared in {builder.data_dir_root}. Prepare it once '
        f'before a multi-process run, e.g. with {how}, so the processes do not all build it.')
  logging.info('Preparing tfds dataset %s into %s (array_record files) ...', name,
               builder.data_dir_root)
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))

