"""Progress lines."""

from resnext_jax.training import reporting


def test_progress_line_gives_time_left_once_compilation_is_behind(monkeypatch):
  clock = iter([0.0, 30.0, 32.0])  # start; 10 steps incl. compile; 10 more steps
  monkeypatch.setattr(reporting.time, 'perf_counter', lambda: next(clock))
  progress = reporting.ProgressLine(total_steps=110, batch_size=16, start_step=0)
  first = progress(10, 1.5, 0.1)
  assert first.endswith('includes compilation') and 'step 10/110' in first
  assert progress(20, 1.2, 0.1) == ('step 20/110 | loss 1.2000 | lr 0.1 | 80.0 img/s | '
                                    '0m18s left')
