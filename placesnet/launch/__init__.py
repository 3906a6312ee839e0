"""Running on a Ray cluster: the driver setup shared by train.py and sweep.py, checks before
anything starts (preflight, resources), Ray Train jobs (trainer, worker, logs, outputs, resume)
and Ray Tune sweeps (sweep)."""
