"""Deterministic, seeded online merging optimizers for PyTorch.

``OnDAREAdamW``, ``OnTIESAdamW`` and ``AdamW`` step CPU tensors in place with
merge-core, the Rust definition of the arithmetic: the same bits on every run,
every thread count and every machine, and the same bits as the ``host`` trainer
for the same model, gradients, seed and step.

The optimizer classes need PyTorch; ``merge_core._merge_core`` (the step over raw
tensor memory) does not, so importing this package never imports torch until an
optimizer class is asked for.
"""

from ._merge_core import CHUNK, CPU_LEVEL, MergeCoreError, __version__

__all__ = ["AdamW", "OnDAREAdamW", "OnTIESAdamW", "MergeCoreError", "CHUNK", "CPU_LEVEL", "__version__"]


def __getattr__(name):
    if name in ("AdamW", "OnDAREAdamW", "OnTIESAdamW"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'merge_core' has no attribute {name!r}")
