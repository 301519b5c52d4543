"""progdistill: progressive distillation of diffusion models (Salimans & Ho, ICLR 2022).

    import progdistill
    model = progdistill.load("runs/demo/distill/steps-0004")
    x = model.sample(num=16, seed=0)
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import progdistill` stays cheap; torch/diffusers load on first use
    if name in ("load", "Model", "generate"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'progdistill' has no attribute {name!r}")


__all__ = ["load", "Model", "generate", "__version__"]
