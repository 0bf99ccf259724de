"""Test-wide setup: 8 simulated CPU devices, so sharding is tested on any machine.

XLA reads the flag when the backend starts, so it is set here, before any test module
imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
