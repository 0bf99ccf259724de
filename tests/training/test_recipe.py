"""The modern recipe's pieces in the trainer: configs/resnext50_tv2.py end to end on a tiny
model, exact resume with every piece on, the moving average in checkpoints, finetuning
and prediction, refusals of bad values, and a real-data check that the pieces still learn.
"""

import os

import numpy as np
import pytest

from resnext_jax import load_pretrained
from resnext_jax.data import pipeline
from resnext_jax.training import checkpoints, trainer
from tests.helpers import ROOT, TINY_MODEL, leaves, read_metrics, tiny_config
from tests.training.test_configs import load

# Every piece of the recipe on, at strengths that make each visible in a few steps.
RECIPE = dict(label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, cutmix_prob=0.5,
              auto_augment='trivial_augment_wide', random_erasing=0.5, ema_decay=0.9,
              ema_every_steps=2, train_image_size=12, warmup_epochs=0.01)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def test_the_tv2_config_runs_end_to_end_on_a_tiny_model(shapes_dir, tmp_path):
  config = load(os.path.join(ROOT, 'configs', 'resnext50_tv2.py')).get_config()
  config.model = TINY_MODEL
  config.update(dataset='shapes', data_dir=shapes_dir, image_size=16, train_image_size=12,
                eval_resize_size=18, batch_size=16, eval_batch_size=64, num_train_steps=6,
                log_every_steps=3, eval_every_steps=3, checkpoint_every_steps=3,
                ema_every_steps=2)
  workdir = str(tmp_path / 'tv2')
  final = trainer.train_and_evaluate(config, workdir)
  assert {'eval_top1', 'eval_ema_top1', 'eval_ema_loss', 'eval_ema_top5'} <= set(final)
  evals = [r for r in read_metrics(workdir) if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [3, 6] and all('eval_ema_top1' in r for r in evals)
  # The average and the weights differ (the average lags), and both load.
  weights = checkpoints.load_variables(workdir)
  average = checkpoints.load_variables(workdir, ema=True)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(weights), leaves(average)))
  loaded, _ = load_pretrained(workdir, ema=True)
  for a, b in zip(leaves(loaded), leaves(average)):
    np.testing.assert_array_equal(a, b)


def test_a_resumed_run_with_every_piece_on_equals_an_uninterrupted_one(shapes_dir, tmp_path):
  whole = str(tmp_path / 'whole')
  trainer.train_and_evaluate(tiny_config(shapes_dir, **RECIPE), whole)
  split = str(tmp_path / 'split')
  trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=3, **RECIPE), split)
  trainer.train_and_evaluate(tiny_config(shapes_dir, **RECIPE), split)  # resumes at 3
  for ema in (False, True):
    for a, b in zip(leaves(checkpoints.load_variables(whole, ema=ema)),
                    leaves(checkpoints.load_variables(split, ema=ema))):
      np.testing.assert_array_equal(a, b)
  # And the pieces do something: the same run without them ends elsewhere.
  plain = str(tmp_path / 'plain')
  trainer.train_and_evaluate(tiny_config(shapes_dir, train_image_size=12), plain)
  assert any(not np.array_equal(a, b) for a, b in zip(
      leaves(checkpoints.load_variables(whole)), leaves(checkpoints.load_variables(plain))))


def test_the_train_batches_follow_the_augmentation_seeded_by_position(shapes_dir):
  config = tiny_config(shapes_dir, **RECIPE)
  first = next(pipeline.create_train_iterator(config))
  again = next(pipeline.create_train_iterator(config))
  np.testing.assert_array_equal(first['image'], again['image'])
  assert first['image'].shape == (16, 12, 12, 3)
  plain = next(pipeline.create_train_iterator(tiny_config(shapes_dir, train_image_size=12)))
  assert not np.array_equal(first['image'], plain['image'])
  np.testing.assert_array_equal(first['label'], plain['label'])  # the same examples


def test_finetuning_from_the_moving_average(shapes_dir, tmp_path):
  source = str(tmp_path / 'source')
  trainer.train_and_evaluate(tiny_config(shapes_dir, ema_decay=0.9, ema_every_steps=1),
                             source)
  config = tiny_config(shapes_dir, init_from=source, init_from_ema=True, num_train_steps=1)
  trainer.train_and_evaluate(config, str(tmp_path / 'finetuned'))
  without = str(tmp_path / 'no_ema')
  trainer.train_and_evaluate(tiny_config(shapes_dir), without)
  with pytest.raises(checkpoints.CheckpointError, match='has no moving average'):
    load_pretrained(without, ema=True)
  with pytest.raises(ValueError, match='only those have a moving average'):
    load_pretrained('resnext50_32x4d.tv2_in1k', ema=True)


@pytest.mark.parametrize('field, value, message', [
    ('mixup_alpha', -0.1, r'config.mixup_alpha=-0.1 is out of range'),
    ('ema_decay', 1.0, r'config.ema_decay=1.0 is out of range.*below 1'),
    ('cutmix_prob', 2.0, r'config.cutmix_prob=2.0 must be within'),
    ('ema_every_steps', 0, r'config.ema_every_steps=0 must be >= 1'),
    ('auto_augment', 'autoaugment', r"config.auto_augment='autoaugment'; use one of '', "
                                    r"'trivial_augment_wide', 'rand_augment'"),
])
def test_bad_recipe_values_are_refused_naming_the_field(shapes_dir, tmp_path, field, value,
                                                        message):
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(tiny_config(shapes_dir, **{field: value}), str(tmp_path))


@pytest.mark.slow
def test_the_recipe_still_learns_the_builtin_dataset(shapes_dir, tmp_path):
  """The quickstart with torchvision V2's pieces on, at its strengths, still learns the
  shapes: 99.2% for the weights, 99.0% for the average when measured. It needs 20 epochs where
  the plain quickstart needs 10 (with all pieces on, 10 epochs reach about 70%: the
  regularisation is made for 600 ImageNet epochs, and TrivialAugmentWide's translations
  of up to 32 px are whole 32 px images). The EMA's nominal decay is set for this run's
  length (torchvision's 0.99998 is for 600 epochs at batch 1024). The bar, 95%, is below
  what it reaches and far above chance (20%)."""
  config = load(os.path.join(ROOT, 'configs', 'quickstart.py')).get_config()
  config.update(data_dir=shapes_dir, num_epochs=20, label_smoothing=0.1, mixup_alpha=0.2,
                cutmix_alpha=1.0, auto_augment='trivial_augment_wide', random_erasing=0.1,
                ema_decay=0.99, ema_every_steps=4, log_every_steps=500, eval_every_steps=5000,
                eval_batch_size=96)
  final = trainer.train_and_evaluate(config, str(tmp_path / 'recipe'))
  assert final['eval_top1'] >= 0.95 and final['eval_ema_top1'] >= 0.95, final
