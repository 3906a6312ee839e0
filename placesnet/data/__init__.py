"""Images in: Places365 or the generated sample in its layout (places, sample, scenes,
sample_hard), the checks before training (validate), transforms, DataLoaders, nvJPEG decode on
GPU workers (gpudecode) and Ray Data input (raydata)."""
