"""Fetching weight files into the cache, checked against their published hash.

A download goes to a temporary file beside its place in the cache and is renamed into
place only once it is complete and its sha256 matches, so an interrupted or corrupt
download never looks like a cached file. `RESNEXT_JAX_WEIGHTS_MIRROR` (a URL or a local
folder) replaces a registered URL's host and path, for machines without internet.
"""

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request

from absl import logging
import tqdm

from resnext_jax.cache import atomic_file, cache_root

MIRROR_VARIABLE = 'RESNEXT_JAX_WEIGHTS_MIRROR'
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(RuntimeError):
  """A weight file could not be fetched or failed its hash; the message says what to do."""


def cache_dir() -> str:
  """`$RESNEXT_JAX_CACHE/weights`, by default `~/.cache/resnext_jax/weights`."""
  return os.path.join(cache_root(), 'weights')


def mirrored(url: str) -> str:
  """`url` with its host and path replaced by `$RESNEXT_JAX_WEIGHTS_MIRROR` (kept as is
  when the variable is unset): the mirror URL or folder plus the original file name."""
  mirror = os.environ.get(MIRROR_VARIABLE, '')
  if not mirror:
    return url
  name = file_name(url)
  if urllib.parse.urlparse(mirror).scheme in ('http', 'https', 'file'):
    return mirror.rstrip('/') + '/' + name
  return os.path.join(os.path.expanduser(mirror), name)


def file_name(url: str) -> str:
  """The last path component of a URL (or the name of a local path)."""
  return os.path.basename(urllib.parse.urlparse(url).path) or 'weights'


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      digest.update(chunk)
  return digest.hexdigest()


def fetch(url: str, destination: str, *, sha256: str | None = None) -> str:
  """The file at `url` (http(s), file:// or a local path) at `destination`, fetched unless
  it is there already. `sha256` may be the full hex digest or a prefix of it (as in
  torchvision's and mmcls' file names); a file that does not match, fetched or found in
  the cache, is refused."""
  if os.path.exists(destination):
    if sha256 and not sha256_of(destination).startswith(sha256.lower()):
      raise DownloadError(f'The cached {destination} does not have the sha256 {sha256} of '
                          f'{url}: delete it, and place the published file there or let '
                          'it download again.')
    return destination
  with atomic_file(destination) as partial:
    with open(partial, 'wb') as out:
      _copy_from(url, out, destination)
    actual = sha256_of(partial)
    if sha256 and not actual.startswith(sha256.lower()):
      raise DownloadError(
          f'{url} has sha256 {actual}, but {sha256} was expected: the file is not the '
          f'published one (or was corrupted on the way). Nothing was cached. '
          + _by_hand(url, destination))
    if not sha256:
      logging.info('%s: sha256 %s (pass it as sha256= to pin this file).', url, actual)
  return destination


def _by_hand(url: str, destination: str) -> str:
  return (f'To place it by hand, download {file_name(url)} on a machine with access and '
          f'copy it to {destination}, or set {MIRROR_VARIABLE} to a folder or URL that '
          'serves it.')


def _copy_from(url: str, out, destination: str) -> None:
  """Streams `url` into the open file `out`, with a progress bar for downloads."""
  scheme = urllib.parse.urlparse(url).scheme
  if scheme not in ('http', 'https', 'file'):
    if not os.path.isfile(url):
      raise DownloadError(f'{url} does not exist. ' + _by_hand(url, destination))
    with open(url, 'rb') as f:
      shutil.copyfileobj(f, out, _CHUNK)
    return
  try:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
      expected = int(response.headers.get('Content-Length') or 0) or None
      received = 0
      with tqdm.tqdm(total=expected, unit='B', unit_scale=True, unit_divisor=1024,
                     desc=file_name(url), disable=scheme == 'file') as bar:
        for chunk in iter(lambda: response.read(_CHUNK), b''):
          out.write(chunk)
          received += len(chunk)
          bar.update(len(chunk))
  except urllib.error.HTTPError as e:
    raise DownloadError(f'Downloading {url} failed: HTTP {e.code} {e.reason}. '
                        + _by_hand(url, destination)) from e
  except http.client.IncompleteRead as e:
    raise DownloadError(f'Downloading {url} stopped before the whole file arrived: the '
                        'connection closed early; nothing was cached. Try again. '
                        + _by_hand(url, destination)) from e
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    reason = getattr(e, 'reason', e)
    raise DownloadError(f'Downloading {url} failed: {reason} (no network, or the host '
                        'refused the connection?). ' + _by_hand(url, destination)) from e
  if expected is not None and received != expected:
    raise DownloadError(f'Downloading {url} stopped after {received:,} of {expected:,} '
                        'bytes: the connection closed early; nothing was cached. Try '
                        'again. ' + _by_hand(url, destination))
