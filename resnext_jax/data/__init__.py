"""Input: sources of examples, preprocessing, and the pipeline that makes global batches.

TensorFlow only ever runs on the host here (tf.data decodes, crops and resizes images):
it is kept off the accelerators that JAX owns as soon as this package is imported, and
its oneDNN rewrites, which serve convolutions and matmuls that it never runs here, are
off unless the user set TF_ENABLE_ONEDNN_OPTS (they print a notice on every start).
"""

import os

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF's devices were set up already; too late to hide them.
  pass
