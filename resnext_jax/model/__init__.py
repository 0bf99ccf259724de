"""The Flax ResNeXt (`resnext.py`) and its layers (`layers.py`)."""
