"""The diffusion maths: schedules, parameterizations, losses, samplers, the denoiser wrapper,
the distillation and guidance targets. Imports torch, numpy, tqdm and `progdistill.errors` only."""
