"""Running one job: training (``train.run``), post-hoc evaluation, callbacks, resume planning, progress."""
