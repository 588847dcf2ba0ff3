"""Types of the compiled core (merge-core over raw CPU tensor memory)."""

from typing import List, Optional, Sequence, Tuple

CHUNK: int
# The vector instructions the step runs with on this CPU: "baseline", "avx2" or
# "avx512" (found at import; every level gives the same bits).
CPU_LEVEL: str
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
        scratch: Optional["Scratch"] = None,
        bounds: Optional[Sequence[Optional[Tuple[int, int, int, int]]]] = None,
    ) -> Optional[List[Tuple[int, int, int, int]]]:
        """Steps each (name, length, grad, param, exp_avg address, exp_avg_sq address,
        cached-delta address or None, task vector or None) in place; nothing is
        written unless every tensor passes. With a ``scratch``, the step's room is
        taken from it and left in it for the next step. With ``bounds`` (one per
        tensor: what the previous call returned for the same parameter and state
        tensors, if nothing has written them since, else None) the validating
        pass does not read them, and the bounds of what was just stored are
        returned."""
    def sharded_step(
        self,
        step: int,
        lr: float,
        tensors: Sequence[Tuple[str, int, int, int, int, int, int, int, Optional[int], Optional[int]]],
    ) -> "ShardedStep":
        """Starts a step over this process's ranges: (name, numel, offset, length,
        grad, param, exp_avg, exp_avg_sq, cached delta or None, task vector or None),
        float32 addresses."""
    def init_task_vectors(self, tensors: Sequence[Tuple[str, int, Memory, Memory, Memory]]) -> None:
        """Writes each (name, length, base, sft, out) task vector τ'."""

class Scratch:
    """Room a step reuses between steps: the OnTIES update, float32, as large as
    the largest tensor stepped (or all of them, for global scope), and each
    thread's chunk buffers."""
    def __init__(self) -> None: ...
    @property
    def nbytes(self) -> int:
        """Bytes held."""

class ShardedStep:
    """A step over sharded tensors: norms and OnTIES histograms are exchanged by
    the caller between these calls (merge_core.optim does it with torch.distributed)."""

    def needs_norms(self) -> bool: ...
    def norm_blocks(self) -> List[Tuple[int, int, int, int, int]]: ...
    def set_norm_blocks(self, blocks: Sequence[Tuple[int, int, int, int, int]]) -> None: ...
    def trims(self) -> bool: ...
    def histograms(self) -> Optional[List[int]]: ...
    def add_histograms(self, counts: Sequence[int]) -> None: ...
    def check(self) -> Optional[str]: ...
    def write(self) -> None: ...
