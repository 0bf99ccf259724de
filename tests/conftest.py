"""Test-wide setup: 8 simulated CPU devices, so sharding is tested on any machine.

XLA reads the flag when the backend starts, so it is set here, before any test module
imports jax.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny programs (and train.py subprocesses compile them again):
# XLA's persistent cache turns those repeats from tens of seconds into a fraction of one.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'resnext_jax-test-xla-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# torchvision (through triton) crashes the process when it is imported after TensorFlow
# (both bring their own LLVM); imported first, both work. The library itself never needs
# the two together: the converter's torch.load does not load triton.
try:
  import torch  # pylint: disable=unused-import
  import torchvision  # pylint: disable=unused-import
except ImportError:  # the parity tests then fail with a clear import error of their own
  pass
