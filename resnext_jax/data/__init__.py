"""Input: sources of examples, preprocessing, and the pipeline that makes global batches.

TensorFlow only ever runs on the host here (tf.data decodes images): it is kept off the
accelerators that JAX owns as soon as this package is imported.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF's devices were set up already; too late to hide them.
  pass
