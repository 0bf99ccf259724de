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

from absl import logging

from resnext_jax import convert
from resnext_jax.model.resnext import ARCHS, ResNeXt
from resnext_jax.training import checkpoints
from resnext_jax.weights import download, registry


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
  """What is known about loaded weights besides the arrays."""
  source: str  # the name, URL or path asked for
  arch: str
  num_classes: int
  class_names: tuple[str, ...] | None
  model_overrides: dict  # ResNeXt fields that differ from the arch (custom sizes)
  resize: int | None  # the eval preprocessing the weights were evaluated with, if known
  crop: int | None
  interpolation: str

  def create_model(self, **kwargs) -> ResNeXt:
    """The model these weights belong to (`kwargs`: e.g. dtype, conv_impl)."""
    from resnext_jax.model.resnext import create_model  # pylint: disable=g-import-not-at-top
    return create_model(self.arch, num_classes=self.num_classes,
                        **{**self.model_overrides, **kwargs})


def load_pretrained(name_or_url: str, *, arch: str | ResNeXt | None = None,
                    sha256: str | None = None) -> tuple[dict, PretrainedInfo]:
  """`({'params', 'batch_stats'}, info)` of the weights `name_or_url` names.

  `arch` (a name from ARCHS or a ResNeXt module) is detected from the weights unless
  given; `sha256` (a digest or its prefix) checks a URL's or file's contents. Raises
  `download.DownloadError`, `convert.ConversionError` or ValueError with what to do.
  """
  source = str(name_or_url)
  local_dir = os.path.expanduser(source)
  if source not in registry.REGISTRY and os.path.isdir(local_dir):
    variables = checkpoints.load_variables(local_dir)
    return variables, _info_from_model_json(source, checkpoints.find_model_info(local_dir),
                                            variables)
  path, key, entry = _fetch(source, sha256)
  if isinstance(arch, ResNeXt):
    key += '-' + hashlib.sha1(repr(arch).encode()).hexdigest()[:8]
  converted = os.path.join(download.cache_dir(), 'converted', key)
  if not os.path.isdir(converted):
    _convert_into(path, converted, arch or (entry.arch if entry else None), source, entry)
  variables = checkpoints.load_variables(converted)
  return variables, _info_from_model_json(source, checkpoints.read_model_info(converted),
                                          variables)


def _fetch(source: str, sha256: str | None):
  """(local file, cache key, registry entry or None) for a name, URL or file."""
  downloads = os.path.join(download.cache_dir(), 'downloads')
  if source in registry.REGISTRY or ('.' in source and '/' not in source
                                     and not os.path.exists(source)):
    entry = registry.lookup(source)  # names close matches when unknown
    name = download.file_name(entry.url)
    path = download.fetch(download.mirrored(entry.url), os.path.join(downloads, name),
                          sha256=entry.sha256)
    return path, entry.name, entry
  if urllib.parse.urlparse(source).scheme in ('http', 'https', 'file'):
    name = download.file_name(source)
    tag = hashlib.sha1(source.encode()).hexdigest()[:12]
    path = download.fetch(source, os.path.join(downloads, f'{tag}-{name}'), sha256=sha256)
    return path, f'{tag}-{name}', None
  path = os.path.expanduser(source)
  if not os.path.isfile(path):
    raise ValueError(f'{source!r} is neither a registered weights name, a URL nor an '
                     f'existing file or directory. Registered: {", ".join(registry.REGISTRY)}.')
  digest = download.sha256_of(path)
  if sha256 and not digest.startswith(sha256.lower()):
    raise download.DownloadError(f'{path} has sha256 {digest}, but {sha256} was expected.')
  return path, f'{digest[:16]}-{os.path.basename(path)}', None


def _convert_into(path, converted, arch, source, entry) -> None:
  """Converts the PyTorch/safetensors file at `path` and caches it at `converted`."""
  state_dict = convert.read_torch_file(path)
  if entry is None:
    logging.info('Weights %s: sha256 %s.', source, download.sha256_of(path))
  if arch is None:
    arch = convert.describe_weights(convert.normalize_keys(state_dict))
    if arch not in ARCHS:
      raise convert.ConversionError(f'Cannot tell the arch of {source}: it looks like {arch}. '
                                    'Pass arch=... (a name or a ResNeXt module).')
  if isinstance(arch, ResNeXt):  # a custom size: keep it, with the weights' class count
    fc = convert.normalize_keys(state_dict).get('fc.weight')
    arch = arch.clone(num_classes=int(fc.shape[0])) if fc is not None else arch
  variables = convert.convert_state_dict(state_dict, arch)
  extra = {}
  if isinstance(arch, ResNeXt):
    extra['model'] = _overrides_of(arch)
  if entry is not None:
    extra['eval'] = {'resize': entry.resize, 'crop': entry.crop,
                     'interpolation': entry.interpolation}
  info = convert.model_info(arch if isinstance(arch, str) else _arch_of(arch), variables,
                            source, **extra)
  checkpoints.save_variables(variables, converted, model_info=info, overwrite=True)


def _arch_of(model: ResNeXt) -> str:
  """The registered arch a custom-size model was built from, by its stage layout."""
  for name, (stages, cardinality, width) in ARCHS.items():
    if (tuple(model.stage_sizes), model.cardinality, model.width_per_group) == (
        tuple(stages), cardinality, width):
      return name
  return 'resnext50_32x4d'  # any arch: the overrides give every size


def _overrides_of(model: ResNeXt) -> dict:
  return {'stage_sizes': list(model.stage_sizes), 'cardinality': model.cardinality,
          'width_per_group': model.width_per_group, 'base_planes': model.base_planes}


def _info_from_model_json(source: str, info: dict | None, variables: dict) -> PretrainedInfo:
  info = info or {}
  num_classes = int(variables['params']['fc']['bias'].shape[0])
  evaluation = info.get('eval') or {}
  names = info.get('class_names')
  return PretrainedInfo(
      source=source, arch=info.get('arch', 'resnext50_32x4d'), num_classes=num_classes,
      class_names=tuple(names) if names and len(names) == num_classes else None,
      model_overrides={k: tuple(v) if isinstance(v, list) else v
                       for k, v in (info.get('model') or {}).items()},
      resize=evaluation.get('resize'), crop=evaluation.get('crop'),
      interpolation=evaluation.get('interpolation', 'bilinear'))


def main(argv: list[str]) -> int:
  if not argv:
    print('| name | top-1 | top-5 | eval resize/crop | sha256 | url |')
    print('|---|---:|---:|---|---|---|')
    for e in registry.ENTRIES:
      print(f'| {e.name} | {e.top1} | {e.top5} | {e.resize}/{e.crop} {e.interpolation} | '
            f'{e.sha256 or "-"} | {e.url} |')
    return 0
  for source in argv:
    try:
      _, info = load_pretrained(source)
    except (ValueError, download.DownloadError, checkpoints.CheckpointError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    print(f'{source}: {info.arch}, {info.num_classes} classes, cached in '
          f'{download.cache_dir()}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
