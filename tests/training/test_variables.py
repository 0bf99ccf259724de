"""The configured model (compute dtype) and its first variables: a new head, nothing else."""

import jax
import numpy as np
import pytest

from resnext_jax.model.resnext import ResNeXt, init_variables
from resnext_jax.training import variables
from tests.helpers import TINY_MODEL


def test_merge_pretrained_replaces_only_a_head_of_a_different_size():
  source = init_variables(ResNeXt(num_classes=10, **TINY_MODEL), jax.random.PRNGKey(1), 32)
  target = init_variables(ResNeXt(num_classes=3, **TINY_MODEL), jax.random.PRNGKey(2), 32)
  merged, not_loaded = variables.merge_pretrained(jax.device_get(target),
                                                jax.device_get(source), 'SRC')
  assert not_loaded == ['params/fc/bias: checkpoint (10,), this config (3,)',
                        'params/fc/kernel: checkpoint (64, 10), this config (64, 3)']
  np.testing.assert_array_equal(merged['params']['fc']['kernel'],
                                target['params']['fc']['kernel'])
  np.testing.assert_array_equal(merged['params']['conv1']['kernel'],
                                source['params']['conv1']['kernel'])
  np.testing.assert_array_equal(merged['batch_stats']['bn1']['var'],
                                source['batch_stats']['bn1']['var'])


def test_merge_pretrained_refuses_a_different_backbone():
  source = init_variables(ResNeXt(num_classes=3, **TINY_MODEL), jax.random.PRNGKey(1), 32)
  other = dict(TINY_MODEL, stage_sizes=(1, 2))
  target = init_variables(ResNeXt(num_classes=3, **other), jax.random.PRNGKey(2), 32)
  with pytest.raises(ValueError, match=r'init_from=SRC does not fit.*15 variables differ'
                                       r'.*\n  params/layer2_1/bn1/bias: missing, '
                                       r'this config \(16,\)'):
    variables.merge_pretrained(jax.device_get(target), jax.device_get(source), 'SRC')
  wider = dict(TINY_MODEL, width_per_group=4)
  target = init_variables(ResNeXt(num_classes=3, **wider), jax.random.PRNGKey(2), 32)
  with pytest.raises(ValueError, match=r'checkpoint \(8,\), this config \(16,\)'):
    variables.merge_pretrained(jax.device_get(target), jax.device_get(source), 'SRC')


def test_the_compute_dtype_follows_the_backend():
  assert jax.default_backend() == 'cpu'
  assert variables.compute_dtype('auto') == 'float32'  # bfloat16 on GPU and TPU
  assert variables.compute_dtype('bfloat16') == 'bfloat16'
  with pytest.raises(ValueError, match=r"config.dtype='float16'; use 'auto'"):
    variables.compute_dtype('float16')
