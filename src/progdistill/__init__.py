"""progdistill: progressive distillation of diffusion models (Salimans & Ho, ICLR 2022).

    import progdistill
    model = progdistill.load("runs/demo/distill/steps-0004")
    x = model.sample(num=16, seed=0)
"""

from progdistill.version import __version__


def __getattr__(name):  # lazy: `import progdistill` stays cheap; torch/diffusers load on first use
    if name in ("load", "Model", "generate"):
        from progdistill import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'progdistill' has no attribute {name!r}")


__all__ = ["load", "Model", "generate", "__version__"]
