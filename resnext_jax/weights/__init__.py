"""Published weights: the registry (`registry.py`, with the ImageNet class names beside
it) and fetching files into the cache (`download.py`). `pretrained.load_pretrained` at
the package top puts them together."""
