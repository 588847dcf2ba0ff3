"""Types of the compiled core (merge-core over raw CPU tensor memory)."""

from typing import Optional, Sequence, Tuple

CHUNK: int
__version__: str

class MergeCoreError(ValueError):
    """A value merge-core refuses; the message names the tensor, element index or hyperparameter."""

# (address, dtype code): 0 float32, 1 bfloat16, 2 float16.
Memory = Tuple[int, int]

class Core:
    def __init__(
        self,
        *,
        method: str,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        adam_form: str,
        p: float,
        alpha: float,
        rescale: bool,
        clip: float,
        variant: str,
        scope: str,
        k: int,
        seed: int,
        warmup_cosine: Optional[Tuple[int, int]] = None,
    ) -> None: ...
    def step(
        self,
        step: int,
        lr: float,
        tensors: Sequence[Tuple[str, int, Memory, Memory, int, int, Optional[int], Optional[Memory]]],
        threads: int,
    ) -> None:
        """Steps each (name, length, grad, param, exp_avg address, exp_avg_sq address,
        cached-delta address or None, task vector or None) in place; nothing is
        written unless every tensor passes."""
    def init_task_vectors(self, tensors: Sequence[Tuple[str, int, Memory, Memory, Memory]]) -> None:
        """Writes each (name, length, base, sft, out) task vector τ'."""
