"""fedsim: a federated-learning simulator and deployment kit on Flower, PyTorch and Ray.

`fedsim.experiment(...)` builds an experiment config and `fedsim.run(...)` runs it (see
`fedsim.api`); `fedsim.method` holds what a method of your own subclasses.
"""

__version__ = "0.1.0"
__all__ = ["experiment", "run"]


def __getattr__(name: str):
    """`fedsim.experiment` and `fedsim.run`, imported on first use (so `import fedsim.x` stays light)."""
    if name in __all__:
        from fedsim import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsim' has no attribute '{name}'")
