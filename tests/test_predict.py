"""Classifying images with a trained quickstart model, in Python and from the command line."""

import json
import os
import subprocess
import sys

import pytest

from configs import quickstart
from resnext_jax import predict
from resnext_jax.data import shapes
from resnext_jax.training import checkpoints, trainer
from tests.helpers import ROOT


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The quickstart config trained briefly (enough to tell the shapes apart)."""
  root = tmp_path_factory.mktemp('predict')
  shapes_dir = str(root / 'shapes')
  config = quickstart.get_config()
  config.update(data_dir=shapes_dir, num_epochs=5, eval_every_steps=10_000,
                eval_batch_size=64, checkpoint_every_steps=10_000)
  workdir = str(root / 'run')
  trainer.train_and_evaluate(config, workdir)
  return workdir, os.path.join(shapes.ensure_generated(shapes_dir), 'validation')


def _validation_sample(validation_dir, per_class=8):
  return [os.path.join(validation_dir, name, file) for name in shapes.CLASS_NAMES
          for file in sorted(os.listdir(os.path.join(validation_dir, name)))[:per_class]]


@pytest.mark.slow
def test_the_run_remembers_its_classes_and_predicts_them(trained):
  workdir, validation_dir = trained
  info = checkpoints.find_model_info(os.path.join(workdir, 'checkpoints'))
  assert tuple(info['class_names']) == shapes.CLASS_NAMES
  assert info['model']['stage_sizes'] == [1, 1, 1, 1]
  predictor = predict.Predictor.from_pretrained(workdir, batch_size=16)
  paths = _validation_sample(validation_dir)
  results = predictor.classify(paths, top_k=2)
  assert list(results) == paths
  top = list(results.values())
  right = sum(t[0][0] == os.path.basename(os.path.dirname(p)) for p, t in zip(paths, top))
  assert right >= 0.9 * len(paths), f'{right} of {len(paths)} right'
  assert all(1 >= t[0][1] >= t[1][1] >= 0 for t in top)


@pytest.mark.slow
def test_the_command_line_prints_json_and_skips_a_corrupt_file(trained, tmp_path):
  workdir, validation_dir = trained
  images = tmp_path / 'images'
  images.mkdir()
  for path in _validation_sample(validation_dir, per_class=1):
    label = os.path.basename(os.path.dirname(path))
    (images / f'{label}.jpg').write_bytes(open(path, 'rb').read())
  (images / 'corrupt.jpg').write_bytes(b'not a jpeg at all')
  result = subprocess.run(
      [sys.executable, '-m', 'resnext_jax.predict', f'--weights={workdir}', '--json',
       '--top_k=3', str(images)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert f'skipped {images / "corrupt.jpg"}: not a readable image' in result.stderr
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [os.path.basename(r['path']) for r in lines] == sorted(
      f'{name}.jpg' for name in shapes.CLASS_NAMES)
  assert all(len(r['top_k']) == 3 and r['top_k'][0]['label'] in shapes.CLASS_NAMES
             for r in lines)

  only_corrupt = subprocess.run(
      [sys.executable, '-m', 'resnext_jax.predict', f'--weights={workdir}',
       str(images / 'corrupt.jpg')], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert only_corrupt.returncode == 1
  assert 'none of the images could be read' in only_corrupt.stderr


def test_eval_only_refuses_weights_with_another_head(tmp_path):
  """Evaluating a 5-class run on a 5-class dataset works; forcing 7 classes is refused."""
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  shapes_dir = str(tmp_path / 'shapes')
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=1,
                                         checkpoint_every_steps=1), workdir)
  config = tiny_config(shapes_dir, eval_only=True, init_from=workdir, num_classes=7)
  with pytest.raises(ValueError, match=r'init_from=.* has a head of another class count'
                                       r'(.|\n)*params/fc/bias: checkpoint \(5,\), this '
                                       r'config \(7,\)'):
    trainer.train_and_evaluate(config, str(tmp_path / 'eval'))
