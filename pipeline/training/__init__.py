"""Training: the loop and everything that decides within it.

trainer.py    the loop, top to bottom: the only module that knows the order of things
step.py       one training step and one evaluation (the eval command and bench share them)
state.py      what a run carries besides model and optimizer (position, hidden state)
resume.py     where a run goes on from, and loading it under changed conditions
optim.py      optimizer, parameter groups, LR schedule, clipping
precision.py  autocast and the GradScaler; autoamp.py: train.amp=auto by measuring
budget.py     the time budget; stopper.py: signals, time limits, the stop check
nonfinite.py  the non-finite guard; saver.py: when a checkpoint is written
gradsync.py   dist.grad_sync: DDP, or the shared-memory average of CPU ranks on one node
hostmem.py    the process keeps the host memory a step frees (no page faults a step)
"""
