"""Published ResNeXt ImageNet-1k weights, as data: where each file is, its published hash,
its layout, how its publisher evaluated it, and what it reached.

Names are `<arch>.<tag>`. The facts come from the publishers' own code (the `source` of
each entry); `sha256` is what the publisher publishes: the digest prefix in torchvision's
and mmcls' file names (torch.hub checks the same prefix), the full digest where known,
or None where the publisher gives none (the file is then used unchecked, and its digest
is logged so that it can be pinned). `imagenet_classes.txt` beside this file holds the
1,000 ImageNet-1k class names in label order, from torchvision
(`torchvision/models/_meta.py`, `_IMAGENET_CATEGORIES`; BSD-3-Clause).
"""

import dataclasses
import difflib
import os

_IMAGENET_TERMS = 'trained on ImageNet-1k, whose terms allow non-commercial research use'
_TV_LICENSE = ('torchvision (BSD-3-Clause) names no license for these weights; '
               + _IMAGENET_TERMS)
_TV_SOURCE = 'pytorch/vision torchvision/models/resnet.py (torchvision 0.29.1)'
_MMCLS_URL = 'https://download.openmmlab.com/mmclassification/v0/resnext/'
_MMCLS_SOURCE = ('open-mmlab/mmpretrain configs/resnext/metafile.yml; test pipeline in '
                 'configs/_base_/datasets/imagenet_bs32_pil_resize.py')
_TIMM_SOURCE = ('huggingface/pytorch-image-models timm/models/resnet.py (default_cfgs); '
                'results in results/results-imagenet.csv')


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
  name: str  # '<arch>.<tag>'
  arch: str  # a name from model.resnext.ARCHS
  url: str
  sha256: str | None  # hex digest or its published prefix
  layout: str  # 'torchvision' (also timm's) or 'mmcls'
  resize: int  # eval: shorter side resized to this ...
  crop: int  # ... then the central crop of this size
  interpolation: str  # of the eval resize: 'bilinear' or 'bicubic'
  top1: float  # the publisher's ImageNet-1k validation results
  top5: float
  license: str
  source: str  # where the facts above were read


def _hash_in_name(url: str) -> str:
  """The sha256 prefix a publisher puts in a file name (`...-1a0047aa.pth`)."""
  return url.rsplit('-', 1)[1].split('.')[0]


def _torchvision(arch, tag, file, resize, top1, top5):
  url = f'https://download.pytorch.org/models/{file}'
  return WeightsEntry(
      name=f'{arch}.{tag}', arch=arch, url=url, sha256=_hash_in_name(url),
      layout='torchvision', resize=resize, crop=224, interpolation='bilinear', top1=top1,
      top5=top5, license=_TV_LICENSE, source=_TV_SOURCE)


def _mmcls(arch, file, top1, top5):
  url = _MMCLS_URL + file
  return WeightsEntry(
      name=f'{arch}.mmcls_in1k', arch=arch, url=url, sha256=_hash_in_name(url),
      layout='mmcls', resize=256, crop=224, interpolation='bilinear', top1=top1, top5=top5,
      license='Apache-2.0 (MMClassification); ' + _IMAGENET_TERMS, source=_MMCLS_SOURCE)


def _timm(arch, tag, url, resize, crop, top1, top5, license_note):
  return WeightsEntry(
      name=f'{arch}.{tag}', arch=arch, url=url, sha256=_hash_in_name(url),
      layout='torchvision', resize=resize, crop=crop, interpolation='bicubic', top1=top1,
      top5=top5, license=license_note + '; ' + _IMAGENET_TERMS, source=_TIMM_SOURCE)


_TIMM_RELEASES = 'https://github.com/huggingface/pytorch-image-models/releases/download/'
_RW_RELEASES = 'https://github.com/rwightman/pytorch-image-models/releases/download/'


ENTRIES = (
    _torchvision('resnext50_32x4d', 'tv_in1k', 'resnext50_32x4d-7cdf4587.pth', 256,
                 77.618, 93.698),
    _torchvision('resnext50_32x4d', 'tv2_in1k', 'resnext50_32x4d-1a0047aa.pth', 232,
                 81.198, 95.340),
    _torchvision('resnext101_32x8d', 'tv_in1k', 'resnext101_32x8d-8ba56ff5.pth', 256,
                 79.312, 94.526),
    _torchvision('resnext101_32x8d', 'tv2_in1k', 'resnext101_32x8d-110c445d.pth', 232,
                 82.834, 96.228),
    _torchvision('resnext101_64x4d', 'tv_in1k', 'resnext101_64x4d-173b62eb.pth', 232,
                 83.246, 96.454),
    _mmcls('resnext50_32x4d', 'resnext50_32x4d_b32x8_imagenet_20210429-56066e27.pth',
           77.90, 93.66),
    _mmcls('resnext101_32x4d', 'resnext101_32x4d_b32x8_imagenet_20210506-e0fa3dd5.pth',
           78.61, 94.17),
    _mmcls('resnext101_32x8d', 'resnext101_32x8d_b32x8_imagenet_20210506-23a247d5.pth',
           79.27, 94.58),
    _mmcls('resnext152_32x4d', 'resnext152_32x4d_b32x8_imagenet_20210524-927787be.pth',
           78.88, 94.33),
    # timm's results at 288 px (its test size for these); at the 224 px of its training
    # config they are lower. The same weights are on the Hugging Face hub as timm/<name>.
    _timm('resnext50_32x4d', 'a1h_in1k',
          _RW_RELEASES + 'v0.1-rsb-weights/resnext50_32x4d_a1h-0146ab0a.pth', 288, 288,
          82.014, 95.934, 'Apache-2.0 (timm; model card not read offline)'),
    _timm('resnext50_32x4d', 'a1_in1k',
          _TIMM_RELEASES + 'v0.1-rsb-weights/resnext50_32x4d_a1_0-b5a91a1d.pth', 288, 288,
          81.466, 95.174, 'Apache-2.0 (timm model card)'),
    _timm('resnext50_32x4d', 'ra_in1k',
          _TIMM_RELEASES + 'v0.1-weights/resnext50_32x4d_ra-d733960d.pth', 303, 288,
          80.698, 95.390, 'Apache-2.0 (timm; model card not read offline)'),
    _timm('resnext101_64x4d', 'c1_in1k',
          _RW_RELEASES + 'v0.1-tpu-weights/resnext101_64x4d_c-0d0e0cc0.pth', 288, 288,
          83.156, 96.374, 'Apache-2.0 (timm; model card not read offline)'),
)

REGISTRY = {entry.name: entry for entry in ENTRIES}
BY_URL = {entry.url: entry for entry in ENTRIES}


def lookup(name: str) -> WeightsEntry:
  """The registered entry called `name`; a ValueError lists the close names otherwise."""
  if name in REGISTRY:
    return REGISTRY[name]
  close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise ValueError(f'{name!r} is not a registered weights name.{hint} Registered: '
                   f'{", ".join(REGISTRY)}; or pass a URL or a local path.')


def imagenet_class_names() -> tuple[str, ...]:
  """The 1,000 ImageNet-1k class names, in the label order of every registered entry."""
  with open(os.path.join(os.path.dirname(__file__), 'imagenet_classes.txt')) as f:
    return tuple(line.rstrip('\n') for line in f)
