"""Building blocks that every implementation of the model's ops shares.

XLA's reference convolution (what `'xla'` runs, and what the fast forms fall back to),
output sizes under explicit padding, strided windows of an NHWC tensor, and sums added
as balanced trees.
"""

from typing import Sequence

from jax import lax

Padding = Sequence[tuple[int, int]]

DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def conv_xla(x, kernel, strides, padding, groups):
  """The reference: XLA's convolution with `feature_group_count`."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=DIMENSIONS, feature_group_count=groups)


def tree_sum(terms):
  """Sums a list of arrays pairwise, so that the adds form a tree of logarithmic depth.

  XLA keeps the association order of floating-point adds; a left-to-right chain of n
  adds is n dependent vector instructions, a tree only log2(n).
  """
  terms = list(terms)
  while len(terms) > 1:
    pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
    terms = pairs + terms[len(pairs) * 2:]
  return terms[0]


def output_size(size, k, stride, pad):
  """Output positions of a window of size `k` at `stride` over `size` padded by `pad`."""
  return (size + pad[0] + pad[1] - k) // stride + 1


def strided_window(x, start_h, start_w, size_h, size_w, stride_h, stride_w):
  """x[:, start_h::stride_h, start_w::stride_w] with size_h x size_w positions."""
  n = x.shape[0]
  rest = x.shape[3:]
  return lax.slice(
      x, (0, start_h, start_w) + (0,) * len(rest),
      (n, start_h + stride_h * (size_h - 1) + 1, start_w + stride_w * (size_w - 1) + 1)
      + rest,
      (1, stride_h, stride_w) + (1,) * len(rest))

