"""Pretrained weights in one call: `load_pretrained(name_or_url)`.

    variables, info = resnext_jax.load_pretrained('resnext50_32x4d.tv2_in1k')
    python -m resnext_jax.pretrained                       # lists the registered weights
    python -m resnext_jax.pretrained resnext50_32x4d.tv2_in1k   # fetches and converts one

A source is a registered name (`weights/registry.py`), an `http(s)://` or `file://` URL,
a PyTorch or safetensors file, or a directory this package wrote (converter output or a
training workdir). Downloads and their conversions are cached under
`$RESNEXT_JAX_CACHE/weights` (default `~/.cache/resnext_jax/weights`): the second call
touches no network and needs no torch.
"""

import dataclasses
import hashlib
import os
import sys
import urllib.parse

import jax
from etils import epath

from resnext_jax import convert, storage
from resnext_jax.model.resnext import ARCHS, ResNeXt, create_model
from resnext_jax.training import checkpoints
from resnext_jax.weights import download, registry


# Part of every converted cache entry's name: bump when conversion or model.json change.
_CACHE_FORMAT = 'v1'


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
  """What is known about loaded weights besides the arrays."""
  source: str  # the name, URL or path asked for
  arch: str | None  # None: a directory without model.json (pass arch= to name it)
  num_classes: int
  class_names: tuple[str, ...] | None
  model_overrides: dict  # ResNeXt fields that differ from the arch (custom sizes)
  resize: int | None  # the eval preprocessing the weights were evaluated with, if known
  crop: int | None
  interpolation: str

  def create_model(self, **kwargs) -> ResNeXt:
    """The model these weights belong to (`kwargs`: e.g. dtype, conv_impl)."""
    if self.arch is None:
      raise ValueError(f'{self.source} has no model.json saying which arch it is: pass '
                       f'arch=NAME to load_pretrained (one of {", ".join(ARCHS)}).')
    return create_model(self.arch, num_classes=self.num_classes,
                        **{**self.model_overrides, **kwargs})


def load_pretrained(name_or_url: str, *, arch: str | ResNeXt | None = None,
                    sha256: str | None = None,
                    ema: bool = False) -> tuple[dict, PretrainedInfo]:
  """`({'params', 'batch_stats'}, info)` of the weights `name_or_url` names.

  `arch` (a name from ARCHS or a ResNeXt module) is detected from the weights unless
  given; `sha256` (a digest or its prefix) checks a URL's or file's contents; `ema` takes
  a training workdir's moving average of the weights instead of the weights. Raises
  `download.DownloadError`, `convert.ConversionError` or ValueError with what to do.
  """
  source = str(name_or_url)
  entry = registry.REGISTRY.get(source) or registry.BY_URL.get(source)
  directory = storage.resolve(source) if not _is_url(source) else None
  if entry is None and directory and epath.Path(directory).is_dir():
    variables = checkpoints.load_variables(directory, ema=ema)
    info = checkpoints.find_model_info(directory) or {}
    if isinstance(arch, str):
      info = {**info, 'arch': arch}
    return variables, _info(source, info, variables, entry)
  if ema:
    raise ValueError(f'{source} is not a training workdir: only those have a moving '
                     'average of the weights to load (ema=True).')
  key = _cache_key(source, entry)
  if isinstance(arch, ResNeXt):
    key += '-' + hashlib.sha1(repr(_overrides_of(arch)).encode()).hexdigest()[:8]
  converted = os.path.join(download.cache_dir(), 'converted', f'{_CACHE_FORMAT}-{key}')
  cached = os.path.isdir(os.path.join(converted, checkpoints.VARIABLES_ITEM))
  if not cached or sha256:  # a cached conversion needs its file again only to check sha256=
    path = _fetch(source, entry, sha256)
  if cached:
    variables = checkpoints.load_variables(converted)
    info = checkpoints.read_model_info(converted)
    return variables, _info(source, info, variables, entry)
  try:
    variables, info = _convert(path, arch or (entry.arch if entry else None), source, entry)
  except (convert.ConversionError, checkpoints.CheckpointError):
    if entry is None and sha256 is None and path.startswith(download.cache_dir()):
      os.unlink(path)  # an unverified download that is not weights (an error page?)
    raise
  if jax.process_count() == 1:  # on a pod every process converts for itself
    try:
      checkpoints.save_variables(variables, converted, model_info=info)
    except (checkpoints.CheckpointError, OSError):
      pass  # another process on this machine cached it first
  return variables, _info(source, info, variables, entry)


def _is_url(source: str) -> bool:
  return urllib.parse.urlparse(source).scheme in ('http', 'https', 'file')


def _download_name(source: str) -> str:
  """A URL's file name in the downloads cache, prefixed by a tag of the whole URL."""
  return f'{hashlib.sha1(source.encode()).hexdigest()[:12]}-{download.file_name(source)}'


def _cache_key(source: str, entry: registry.WeightsEntry | None) -> str:
  """The name of a registered entry's, a URL's or a file's conversion in the cache."""
  if entry is not None:
    return f'{entry.name}-{entry.sha256}'
  if _is_url(source):
    return _download_name(source)
  path = os.path.expanduser(source)
  if not os.path.isfile(path):
    if '/' not in source and '.' in source:
      registry.lookup(source)  # raises, naming the registered names closest to it
    raise ValueError(f'{source!r} is neither a registered weights name, a URL nor an '
                     'existing file or directory. Registered: '
                     f'{", ".join(registry.REGISTRY)}.')
  stat = os.stat(path)
  tag = hashlib.sha1(f'{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
  return f'{tag.hexdigest()[:12]}-{os.path.basename(path)}'


def _fetch(source: str, entry: registry.WeightsEntry | None, sha256: str | None) -> str:
  """The local file of a registered entry, a URL (downloaded) or a file, hash-checked."""
  downloads = os.path.join(download.cache_dir(), 'downloads')
  if entry is not None:
    return download.fetch(download.mirrored(entry.url),
                          os.path.join(downloads, download.file_name(entry.url)),
                          sha256=entry.sha256)
  if _is_url(source):
    return download.fetch(source, os.path.join(downloads, _download_name(source)),
                          sha256=sha256)
  path = os.path.expanduser(source)
  if sha256:
    digest = download.sha256_of(path)
    if not digest.startswith(sha256.lower()):
      raise download.DownloadError(f'{path} has sha256 {digest}, but {sha256} was '
                                   'expected.')
  return path


def _convert(path, arch, source, entry) -> tuple[dict, dict]:
  """Converts the PyTorch/safetensors file at `path`: (variables, model.json contents)."""
  state_dict = convert.read_torch_file(path)
  weights = convert.normalize_keys(state_dict)
  if arch is None:
    arch = convert.describe_weights(weights)
    if arch not in ARCHS:
      raise convert.ConversionError(f'Cannot tell the arch of {source}: it looks like '
                                    f'{arch}. Pass arch=... (a name or a ResNeXt module).')
  extra = {}
  if isinstance(arch, ResNeXt):  # a custom size: keep it, with the weights' class count
    fc = weights.get('fc.weight')
    arch = arch.clone(num_classes=int(fc.shape[0])) if fc is not None else arch
    extra['model'] = _overrides_of(arch)
  variables = convert.convert_state_dict(state_dict, arch)
  arch_name = arch if isinstance(arch, str) else _arch_of(arch)
  return variables, convert.model_info(arch_name, variables, source, **extra)


def _arch_of(model: ResNeXt) -> str:
  """The registered arch with a custom-size model's stage layout, else resnext50_32x4d
  (model.json's "model" fields then give every size)."""
  for name, (stages, cardinality, width) in ARCHS.items():
    if (tuple(model.stage_sizes), model.cardinality, model.width_per_group) == (
        tuple(stages), cardinality, width):
      return name
  return 'resnext50_32x4d'


def _overrides_of(model: ResNeXt) -> dict:
  return {'stage_sizes': list(model.stage_sizes), 'cardinality': model.cardinality,
          'width_per_group': model.width_per_group, 'base_planes': model.base_planes}


def _info(source: str, info: dict | None, variables: dict,
          entry: registry.WeightsEntry | None) -> PretrainedInfo:
  """The PretrainedInfo of loaded variables, from model.json and the registry entry."""
  info = info or {}
  num_classes = int(variables['params']['fc']['bias'].shape[0])
  evaluation = info.get('eval') or {}
  if entry is not None:  # the registry, not the cache, is the source of these facts
    evaluation = {'resize': entry.resize, 'crop': entry.crop,
                  'interpolation': entry.interpolation}
  names = info.get('class_names')
  return PretrainedInfo(
      source=source, arch=info.get('arch'), num_classes=num_classes,
      class_names=tuple(names) if names and len(names) == num_classes else None,
      model_overrides={k: tuple(v) if isinstance(v, list) else v
                       for k, v in (info.get('model') or {}).items()},
      resize=evaluation.get('resize'), crop=evaluation.get('crop'),
      interpolation=evaluation.get('interpolation', 'bilinear'))


def main(argv: list[str]) -> int:
  if not argv:
    print('| name | top-1 | top-5 | eval resize/crop | layout | sha256 | url |')
    print('|---|---:|---:|---|---|---|---|')
    for e in registry.ENTRIES:
      print(f'| {e.name} | {e.top1} | {e.top5} | {e.resize}/{e.crop} {e.interpolation} | '
            f'{e.layout} | {e.sha256 or "-"} | {e.url} |')
    return 0
  for source in argv:
    try:
      _, info = load_pretrained(source)
    except (ValueError, download.DownloadError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    print(f'{source}: {info.arch}, {info.num_classes} classes, cached in '
          f'{download.cache_dir()}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
