"""notebooks/resnext_jax.ipynb: stored without outputs, and run top to bottom on the CPU.

The run is the notebook's quick mode (RESNEXT_JAX_NOTEBOOK_QUICK=1) in a real Jupyter
kernel (nbclient). Its install cell points at this checkout; its classification cell
downloads a stand-in for the ImageNet weights (a torchvision resnext50_32x4d with random
weights) from a server on 127.0.0.1: a registered name is checked against its publisher's
hash, which no stand-in file has, so the stand-in goes by URL through the same download,
conversion and prediction code.
"""

import os
import re

import nbformat
import pytest
import torch
import torchvision

from tests.helpers import ROOT, FileServer, randomized

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'resnext_jax.ipynb')


def _cells_by_tag(notebook) -> dict:
  return {tag: cell for cell in notebook.cells for tag in cell.metadata.get('tags', [])}


def _text(cell) -> str:
  return ''.join(output.get('text', '') for output in cell.outputs)


def _images(cell) -> int:
  return sum('image/png' in output.get('data', {}) for output in cell.outputs)


def test_the_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code), (
      'strip the outputs: jupyter nbconvert --clear-output --inplace ' + NOTEBOOK)
  assert set(_cells_by_tag(notebook)) == {'install', 'classify', 'train', 'plot', 'restore',
                                          'finetune'}


def test_the_notebook_installs_the_jax_the_tests_run():
  import jax  # pylint: disable=g-import-not-at-top
  install = _cells_by_tag(nbformat.read(NOTEBOOK, as_version=4))['install'].source
  pinned = re.search(r"^JAX_VERSION = '([^']+)'", install, re.MULTILINE)
  assert pinned and pinned.group(1) == jax.__version__, (
      f'the notebook installs jax {pinned and pinned.group(1)} on accelerators; these tests '
      f'run jax {jax.__version__}: set JAX_VERSION in its first cell to the tested release')


def test_the_readme_links_the_notebook_in_colab():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  assert re.search(r'https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/'
                   r'notebooks/resnext_jax\.ipynb', readme)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  served = tmp_path / 'served'
  served.mkdir()
  torch.save(randomized(torchvision.models.resnext50_32x4d(), seed=5).state_dict(),
             served / 'stand_in.pth')
  server = FileServer(str(served))
  monkeypatch.setenv('RESNEXT_JAX_SOURCE', ROOT)
  monkeypatch.setenv('RESNEXT_JAX_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('RESNEXT_JAX_NOTEBOOK_WEIGHTS', f'{server.url}/stand_in.pth')
  monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.delenv('XLA_FLAGS')  # one CPU device, as on a CPU runtime
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  work = tmp_path / 'work'
  work.mkdir()
  try:
    NotebookClient(notebook, timeout=900, kernel_name='python3',
                   resources={'metadata': {'path': str(work)}}).execute()
  finally:
    server.stop()
    nbformat.write(notebook, str(tmp_path / 'executed.ipynb'))  # kept for a failure's reader

  cells = _cells_by_tag(notebook)
  install = _text(cells['install'])
  assert 'Devices: [CpuDevice(id=0)]' in install
  assert 'conv_impl: auto -> ' in install
  assert 'RESNEXT_JAX_NOTEBOOK_QUICK is set' in install
  assert _images(cells['classify']) == 1
  assert 'grace_hopper.jpg' in _text(cells['classify'])
  assert re.search(r'step \d+/\d+ \| loss', _text(cells['train']))  # progress in the cell
  assert _images(cells['plot']) == 1
  restored = re.search(r'restored: ([\d.]+)% of 500 validation images right',
                       _text(cells['restore']))
  assert restored and _images(cells['restore']) == 2  # the grid and the confusion matrix
  finetuned = re.search(r'Finetuned accuracy: ([\d.]+)% validation top-1 on 300 images of '
                        r'3 classes', _text(cells['finetune']))
  assert finetuned, _text(cells['finetune'])[-2000:]
  # Five epochs of the quickstart (its quick mode) and one of finetuning reach 98-99% here;
  # the bars leave room for another machine's rounding, far above chance (20%, 33%).
  assert float(restored.group(1)) >= 90
  assert float(finetuned.group(1)) >= 90
