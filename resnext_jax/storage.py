"""Paths that may be local or remote: `gs://` buckets and whatever else etils.epath (and,
through it, tf.io.gfile) reads and writes.

Workdirs, data dirs, `init_from` and the converter's output take either. Remote paths are
used as given (`os.path.abspath` would turn `gs://b/run` into `/cwd/gs:/b/run`); a small
file is written there as one object, which a reader sees whole or not at all, as
`cache.atomic_file` gives on a local disk. Folders are handled with `epath.Path`, and
`os.path.join`/`dirname` work on both kinds of path strings.
"""

import os

from etils import epath

from resnext_jax.cache import atomic_file


def is_remote(path: str) -> bool:
  return '://' in str(path)


def resolve(path: str) -> str:
  """A local path made absolute (and `~` expanded); a remote one as it is."""
  path = str(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def read_text(path: str) -> str | None:
  """The file's text, or None if there is none."""
  try:
    return epath.Path(path).read_text()
  except (FileNotFoundError, NotADirectoryError):
    return None


def write_text(path: str, text: str) -> None:
  """Writes the whole file so that readers never see part of it (creating its folder)."""
  if not is_remote(path):
    with atomic_file(path) as partial:
      with open(partial, 'w') as f:
        f.write(text)
    return
  file = epath.Path(path)
  file.parent.mkdir(parents=True, exist_ok=True)
  file.write_text(text)


def append_text(path: str, text: str) -> None:
  """Appends; on a bucket this rewrites the object (objects cannot grow in place)."""
  with epath.Path(path).open('a') as f:
    f.write(text)
