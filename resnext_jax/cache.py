"""Where resnext_jax keeps what it builds and downloads: `$RESNEXT_JAX_CACHE`, by default
`~/.cache/resnext_jax` (the C++ kernels, downloaded and converted weights), and how a file
gets there without ever being seen half-written."""

import contextlib
import os
import tempfile
from typing import Iterator


def cache_root() -> str:
  return os.environ.get('RESNEXT_JAX_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'resnext_jax'))


@contextlib.contextmanager
def atomic_file(destination: str, mode: int = 0o644) -> Iterator[str]:
  """Yields a temporary path beside `destination` to write; if the block succeeds, the
  file is renamed into place (readable by others sharing the cache), else deleted."""
  directory = os.path.dirname(destination)
  os.makedirs(directory, exist_ok=True)
  fd, partial = tempfile.mkstemp(prefix='.' + os.path.basename(destination) + '.',
                                 dir=directory)
  os.close(fd)
  try:
    yield partial
    os.chmod(partial, mode)  # mkstemp's 0600 would lock out others sharing the cache
    os.replace(partial, destination)
  finally:
    if os.path.exists(partial):
      os.unlink(partial)
