"""Training: distributed setup and the sharded model (parallel), the run's data (run_data), the optimizer
and schedule (optim), one optimizer step (step), checkpoints, the run's lifecycle, validation, metrics,
export, and the run itself (session: starting or resuming it; loop: its outline).

`torchrun -m c2a.train` is the shell (c2a/train/__main__.py); `python -m c2a.train.plot` draws a run's curves.
"""
