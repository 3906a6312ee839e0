"""Training without Ray: the training step, the epoch loop and evaluation (engine), optimizer
and per-step schedule (optim), the LR range test (lr_find). The same code runs in a Ray Train
worker, in plain torch and on a GPU machine that has no Ray."""
