"""What every source of examples provides: its description and its splits, readable by
index from inside a tf.data graph (so that the pipeline's sampler can ask for any
position of the training stream)."""

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before reading it."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...] | None  # Folder names or synsets, to name predictions.



@dataclasses.dataclass(frozen=True)
class Split:
  """A split readable by example index from inside a tf.data graph."""
  num_examples: int
  # int64 indices [b] -> (encoded images: string [b], labels: int32 [b]).
  load: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class Source:
  info: DatasetInfo
  splits: dict[str, Split]



def numpy_load(read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
  """Wraps a numpy batch reader as a graph function."""
  def load(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    records, labels = tf.numpy_function(read, [indices], (tf.string, tf.int32),
                                        stateful=False)
    return tf.ensure_shape(records, indices.shape), tf.ensure_shape(labels, indices.shape)
  return load

