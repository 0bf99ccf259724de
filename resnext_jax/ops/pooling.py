"""The stem's max pool, with the implementation chosen like the convolutions' (`impl`).

JAX differentiates `lax.reduce_window` max through `select_and_scatter_add`, which XLA's
CPU backend expands into a variadic reduce-window over four index arrays and a scatter,
several times slower than the pooling itself. `'taps'` keeps XLA's pooling for the plain
forward pass and gives it a `jax.custom_vjp`: the differentiated forward takes the
maximum over the window taps and stores which tap attained it first (the element
`select_and_scatter_add` picks), and the backward pass routes each output gradient there
with dense pads and adds.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.ops import impl as impls
from resnext_jax.ops.primitives import Padding, output_size, strided_window, tree_sum


def _max_pool_xla(x, window, strides, padding):
  """The reference: `lax.reduce_window` max, as `flax.linen.max_pool` computes it."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + window + (1,),
                           (1,) + strides + (1,), ((0, 0),) + padding + ((0, 0),))


def _windows(x, window, strides, padding):
  """The input under each tap of the window, in row-major tap order."""
  kh, kw = window
  ho = output_size(x.shape[1], kh, strides[0], padding[0])
  wo = output_size(x.shape[2], kw, strides[1], padding[1])
  xp = jnp.pad(x, ((0, 0),) + padding + ((0, 0),), constant_values=-jnp.inf)
  return [strided_window(xp, dh, dw, ho, wo, *strides)
          for dh in range(kh) for dw in range(kw)]


def _max_and_first_argmax(x, window, strides, padding):
  """The pooled maximum and, as int8, the index of the first tap that attains it."""
  windows = _windows(x, window, strides, padding)
  out = windows[0]
  for win in windows[1:]:
    out = jnp.maximum(out, win)
  argmax = jnp.full(out.shape, len(windows) - 1, jnp.int8)
  for t in reversed(range(len(windows) - 1)):
    argmax = jnp.where(windows[t] == out, jnp.int8(t), argmax)
  return out, argmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_taps(x, window, strides, padding):
  # Undifferentiated (eval), XLA's own pooling is the fastest form.
  return _max_pool_xla(x, window, strides, padding)


def _max_pool_taps_fwd(x, window, strides, padding):
  out, argmax = _max_and_first_argmax(x, window, strides, padding)
  return out, (argmax, x.shape)


def _max_pool_taps_bwd(window, strides, padding, residuals, dy):
  """Each tap's share of `dy`, dilated by the stride and shifted to its input positions."""
  argmax, x_shape = residuals
  h, w = x_shape[1:3]
  ho, wo = dy.shape[1:3]
  sh, sw = strides
  zero = jnp.zeros((), dy.dtype)
  terms = []
  for t in range(window[0] * window[1]):
    dh, dw = divmod(t, window[1])
    share = jnp.where(argmax == t, dy, zero)
    # Output (q, r) reads padded input (sh*q + dh, sw*r + dw), i.e. input row sh*q + dh - pad.
    lo_h, lo_w = dh - padding[0][0], dw - padding[1][0]
    terms.append(lax.pad(share, zero, (
        (0, 0, 0), (lo_h, h - lo_h - (sh * (ho - 1) + 1), sh - 1),
        (lo_w, w - lo_w - (sw * (wo - 1) + 1), sw - 1), (0, 0, 0))))
  return (tree_sum(terms),)


_max_pool_taps.defvjp(_max_pool_taps_fwd, _max_pool_taps_bwd)

IMPLEMENTATIONS = {'xla': _max_pool_xla, 'taps': _max_pool_taps, 'native': _max_pool_taps}


def max_pool(x: jax.Array, window: Sequence[int], *, strides: Sequence[int],
             padding: Padding, impl: str) -> jax.Array:
  """Max pool of NHWC `x` with explicit (PyTorch-style, -inf) padding; `impl` is a
  concrete implementation name (`impl.resolve_impl`)."""
  fn = impls.select(IMPLEMENTATIONS, impl, 'max_pool')
  return fn(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))
