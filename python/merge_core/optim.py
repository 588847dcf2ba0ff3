"""The PyTorch optimizers: ``torch.optim.Optimizer`` subclasses over merge-core.

Arguments follow the official ``ODAdamW`` / ``OTAdamW`` (QwenLM/online_merging_
optimizers), with their defaults, plus ``seed``, ``variant``, ``adam_form``,
``scope`` and ``threads``. What differs from the official code is listed in
SPEC.md ("The Python optimizers"): the masks are keyed by (seed, parameter name,
step, element index) instead of a global RNG, top-k is exact with a fixed tie
rule, and every sum has a fixed order.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.optim import Optimizer

from ._merge_core import Core, MergeCoreError, Scratch

__all__ = ["AdamW", "OnDAREAdamW", "OnTIESAdamW", "MergeCoreError"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _memory(t: torch.Tensor, name: str, what: str) -> tuple[int, int]:
    """(address, dtype code) of a tensor merge-core may read or write in place."""
    if t.device.type != "cpu":
        raise ValueError(
            f"parameter `{name}`: {what} is on {t.device}; merge_core steps CPU tensors in place. "
            "Train on the CPU, or step a CPU copy of the parameters (copy the gradients to it, "
            "step, copy the parameters back) and pay two transfers of the model per step."
        )
    if not t.is_contiguous():
        raise ValueError(f"parameter `{name}`: {what} is not contiguous; merge_core needs dense row-major memory")
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"parameter `{name}`: {what} has dtype {t.dtype}; expected float32, bfloat16 or float16")
    return t.data_ptr(), code


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "placements") else t


def _dtensor_shards(named) -> tuple[Optional[dict], object]:
    """shards= and the process group for parameters that are DTensors sharded on
    dim 0 of a 1-D mesh (FSDP2's fully_shard); (None, None) when there are none."""
    shards, group = {}, None
    for p, name in named:
        if not hasattr(p, "placements"):
            continue
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"parameter `{name}`: placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                             "merge_core steps Shard(0) on a 1-D mesh (FSDP2's fully_shard), or ranges given with shards=")
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        row = p.numel() // p.shape[0] if p.dim() and p.shape[0] else 1
        shards[name] = (p.numel(), (offset[0] if p.dim() else 0) * row)
        group = p.device_mesh.get_group()
    return (shards or None), group


# τ' is kept packed (its +0 entries left out, one bit per element saying which
# are stored) unless more than this share of it is stored: DARE and TIES keep a
# fraction reserve_p, so at the paper's 0.01 the packed form costs about 4% of the
# parameter bytes instead of 100%.
_PACK_BELOW = 0.85


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bit i % 8 of byte i // 8 set where flags[i] is."""
    n = flags.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = flags.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _split_names(params, param_names, param_name_map):
    """Parameter groups without names, and each group's list of names (or None)."""
    params = list(params)
    if params and isinstance(params[0], tuple):
        if param_names is not None or param_name_map is not None:
            raise ValueError("names given twice: pass named_parameters() or param_names/param_name_map, not both")
        param_names = [n for n, _ in params]
        params = [p for _, p in params]
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [dict(g, params=list(g["params"])) for g in groups]
    names: list[Optional[list[str]]] = []
    flat = iter(param_names) if param_names is not None else None
    for gid, g in enumerate(groups):
        if "param_names" in g:
            names.append(list(g.pop("param_names")))
        elif flat is not None:
            names.append([next(flat) for _ in g["params"]])
        elif param_name_map is not None:
            names.append([param_name_map[(gid, pid)] for pid in range(len(g["params"]))])
        else:
            names.append(None)
    return groups, names


class _MergingOptimizer(Optimizer):
    """Shared state handling; subclasses fix the merge method."""

    _method = "adamw"

    def __init__(self, params, *, lr, betas, eps, weight_decay, correct_bias, reserve_p, use_merge, alpha, rescale,
                 clip_val, online_step, param_names, param_name_map, seed, variant, adam_form, scope, threads,
                 shards=None, process_group=None, keep_scratch=False):
        if not correct_bias:
            raise ValueError(
                "correct_bias=False is not supported: merge-core defines the bias-corrected Adam forms only "
                "(adam_form='hf', the official code's default, or 'torch')"
            )
        groups, names = _split_names(params, param_names, param_name_map)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(groups, defaults)
        for gid, (group, group_names) in enumerate(zip(self.param_groups, names)):
            if group_names is None:
                if self._method != "adamw":
                    raise ValueError(
                        f"{type(self).__name__} keys its masks by parameter name: pass model.named_parameters(), "
                        "param_names=[...] or param_name_map={(group, index): name}"
                    )
                group_names = [f"group{gid}.param{pid}" for pid in range(len(group["params"]))]
            if len(group_names) != len(group["params"]):
                raise ValueError(f"group {gid}: {len(group_names)} names for {len(group['params'])} parameters")
            group["param_names"] = list(group_names)
        all_names = [n for g in self.param_groups for n in g["param_names"]]
        if len(set(all_names)) != len(all_names):
            dup = next(n for n in all_names if all_names.count(n) > 1)
            raise ValueError(f"parameter name `{dup}` appears twice: masks are keyed by name, names must be unique")
        self.reserve_p, self.use_merge, self.alpha = reserve_p, use_merge, alpha
        self.rescale, self.clip_val, self.online_step = rescale, clip_val, online_step
        self.seed, self.variant, self.adam_form, self.scope = seed, variant, adam_form, scope
        self.threads = threads
        self._scratch = Scratch() if keep_scratch else None
        # Per parameter, what the last step recorded of the state it stored (see _known_bounds).
        self._bounds: dict = {}
        if shards is None:
            shards, mesh_group = _dtensor_shards(self._named())
            process_group = process_group if process_group is not None else mesh_group
        self.shards = self._check_shards(shards)
        self.process_group = process_group
        for group in self.param_groups:
            self._core(group)  # refuse invalid hyperparameters now, not at the first step

    # The settings pickled with the optimizer (torch's own state keeps only
    # defaults, state and param_groups); the room and the bounds a step keeps
    # are rebuilt on use.
    _SETTINGS = ("reserve_p", "use_merge", "alpha", "rescale", "clip_val", "online_step", "seed", "variant",
                 "adam_form", "scope", "threads", "shards")

    def __getstate__(self):
        if self.process_group is not None:
            raise TypeError(f"{type(self).__name__} with a process group cannot be pickled or copied: "
                            "build a new one and load_state_dict() into it")
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._SETTINGS})
        state["keep_scratch"] = self._scratch is not None
        return state

    def __setstate__(self, state):
        state = dict(state)
        keep = state.pop("keep_scratch", False)
        super().__setstate__(state)
        self._scratch = Scratch() if keep else None
        self._bounds = {}
        self.process_group = None

    def _core(self, group) -> Core:
        b1, b2 = group["betas"]
        return Core(
            method=self._method, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
            weight_decay=group["weight_decay"], adam_form=self.adam_form, p=float(self.reserve_p),
            alpha=float(self.alpha if self.use_merge else 0.0), rescale=bool(self.rescale),
            clip=float(self.clip_val), variant=self.variant, scope=self.scope, k=int(self.online_step),
            seed=int(self.seed),
        )

    def _named(self):
        for group in self.param_groups:
            yield from zip(group["params"], group["param_names"])

    def _check_shards(self, shards):
        """{name: (elements in the whole tensor, global index of this process's
        first element)} for parameters that are one process's range of a sharded
        tensor (flattened, row-major)."""
        if shards is None:
            return None
        shards = {name: (int(full), int(offset)) for name, (full, offset) in shards.items()}
        for p, name in self._named():
            if name not in shards:
                raise ValueError(f"parameter `{name}` has no entry in shards=: every parameter of a sharded optimizer needs one")
            full, offset = shards[name]
            p = _local(p)
            if not 0 <= offset <= offset + p.numel() <= full:
                raise ValueError(f"parameter `{name}`: range {offset}+{p.numel()} is outside its {full} elements")
            if p.dtype != torch.float32:
                raise TypeError(f"parameter `{name}`: sharded steps take float32 parameters, not {p.dtype}")
        return shards

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            shape = _local(p).shape
            state["step"] = 0
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32)
            if self.online_step != 1:
                state["cached_delta"] = torch.zeros(shape, dtype=torch.float32)
        return state

    @staticmethod
    def _written_tensors(p: torch.Tensor, state: dict) -> list:
        return [p] + [state[key] for key in ("exp_avg", "exp_avg_sq", "cached_delta") if key in state]

    def _known_bounds(self, p: torch.Tensor, state: dict):
        """The bounds the last step recorded of ``p`` and its moments (and cached
        delta), if they are still the tensors it wrote and no torch operation
        has written them since (their version counters): the core's validating
        pass then need not read them. Same bits either way; writing them behind
        torch's back (``.data``, raw memory) between steps would only lose the
        all-or-nothing refusal, not a bit."""
        kept = self._bounds.get(p)
        if kept is None:
            return None
        refs, versions, bounds = kept
        now = self._written_tensors(p, state)
        if len(now) != len(refs) or any(r() is not t for r, t in zip(refs, now)) or [t._version for t in now] != versions:
            return None
        return bounds

    def _keep_bounds(self, p: torch.Tensor, state: dict, bounds) -> None:
        now = self._written_tensors(p, state)
        self._bounds[p] = ([weakref.ref(t) for t in now], [t._version for t in now], bounds)

    def _task_vector(self, state: dict, name: str):
        """τ' as the core takes it: (address, dtype), packed (bits, values, count), or None."""
        if not self.use_merge:
            return None
        if "tau_ref_stored" in state:
            stored, values = state["tau_ref_stored"], state["tau_ref_values"]
            for t, what in ((stored, "task vector's stored-element bits"), (values, "task vector's values")):
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"parameter `{name}`: {what} must be a contiguous CPU tensor")
            if stored.dtype != torch.uint8 or values.dtype != torch.float32:
                raise TypeError(f"parameter `{name}`: a packed task vector is uint8 bits and float32 values")
            return (stored.data_ptr(), values.data_ptr(), values.numel())
        tau = state.get("tau_ref")
        return None if tau is None else _memory(tau, name, "task vector")

    @torch.no_grad()
    def init_ref_param_diff(self, ref_model: torch.nn.Module, base_model: torch.nn.Module) -> None:
        """Stores each parameter's task vector τ' from the reference (SFT) model and
        the base model, as the official API does; parameters are matched by name.
        A sharded optimizer takes the whole models and keeps its ranges."""
        if self._method == "adamw":
            raise RuntimeError("plain AdamW has no task vector")
        ref, base = dict(ref_model.named_parameters()), dict(base_model.named_parameters())
        for group in self.param_groups:
            jobs, keep = [], []
            for p, name in zip(group["params"], group["param_names"]):
                for model, label in ((ref, "ref_model"), (base, "base_model")):
                    if name not in model:
                        raise KeyError(f"parameter `{name}` is not in {label}.named_parameters()")
                    if self.shards is None and model[name].shape != p.shape:
                        raise ValueError(f"parameter `{name}`: {label} has shape {tuple(model[name].shape)}, the optimizer's has {tuple(p.shape)}")
                b, s = base[name].detach().contiguous(), ref[name].detach().contiguous()
                tau = torch.empty(b.shape, dtype=torch.float32)
                jobs.append((name, b.numel(), _memory(b, name, "base weights"), _memory(s, name, "reference weights"), (tau.data_ptr(), 0)))
                keep.append((p, tau, b, s))
            if self.scope == "global":
                order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].encode())
                jobs, keep = [jobs[i] for i in order], [keep[i] for i in order]
            self._core(group).init_task_vectors(jobs)
            for (p, tau, _, _), job in zip(keep, jobs):
                state = self._state_of(p)
                for key in ("tau_ref", "tau_ref_stored", "tau_ref_values"):
                    state.pop(key, None)
                if self.shards is not None:
                    # τ' is computed on the whole tensor (its masks and top-k are
                    # global); this process keeps its range, densely.
                    full, offset = self.shards[job[0]]
                    if tau.numel() != full:
                        raise ValueError(f"parameter `{job[0]}`: the models' tensor has {tau.numel()} elements, shards= says {full}")
                    state["tau_ref"] = tau.view(-1)[offset:offset + _local(p).numel()].clone()
                    continue
                stored = tau.view(-1).view(torch.int32) != 0
                if stored.sum().item() < _PACK_BELOW * tau.numel():
                    state["tau_ref_stored"], state["tau_ref_values"] = _pack_bits(stored), tau.view(-1)[stored].clone()
                else:
                    state["tau_ref"] = tau

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list] = {}
            for p, name in zip(group["params"], group["param_names"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"parameter `{name}`: sparse gradients are not supported")
                state = self._state_of(p)
                if self._method != "adamw" and self.use_merge and "tau_ref" not in state and "tau_ref_stored" not in state:
                    raise RuntimeError(
                        f"parameter `{name}` has no task vector: call init_ref_param_diff(ref_model, base_model) "
                        "before the first step (or pass use_merge=False)"
                    )
                by_step.setdefault(state["step"] + 1, []).append((p, name, state))
            if self.scope == "global" and self._method == "ties" and len(by_step) > 1:
                raise RuntimeError("global scope needs every parameter of the group at the same step")
            threads = self.threads or torch.get_num_threads()
            if self.shards is not None:
                self._sharded_step(group, by_step)
                continue
            for k, items in by_step.items():
                if self.scope == "global":
                    items.sort(key=lambda it: it[1].encode())
                tensors = []
                for p, name, state in items:
                    tensors.append((
                        name, p.numel(), _memory(p.grad, name, "gradient"), _memory(p.data, name, "parameter"),
                        state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                        state["cached_delta"].data_ptr() if "cached_delta" in state else None,
                        self._task_vector(state, name),
                    ))
                known = [self._known_bounds(p, state) for p, _, state in items]
                for p, _, _ in items:
                    self._bounds.pop(p, None)
                kept = self._core(group).step(k, float(group["lr"]), tensors, threads, self._scratch, known)
                for (p, _, state), bounds in zip(items, kept):
                    state["step"] = k
                    self._keep_bounds(p, state, bounds)
        return loss

    def _sharded_step(self, group, by_step) -> None:
        """One step of this process's ranges, with the exchanges that make it the
        single-process step (see merge_core.distributed)."""
        import torch.distributed as dist

        pg = self.process_group
        if len(by_step) != 1 or sum(len(v) for v in by_step.values()) != len(group["params"]):
            raise RuntimeError("a sharded step needs a gradient for every parameter, all at the same step")
        ((k, items),) = by_step.items()
        if self.scope == "global":
            items.sort(key=lambda it: it[1].encode())
        tensors = []
        for p, name, state in items:
            full, offset = self.shards[name]
            tau = state.get("tau_ref") if self.use_merge else None
            local = _local(p)
            tensors.append((name, full, offset, local.numel(), _memory(_local(p.grad), name, "gradient")[0], _memory(local, name, "parameter")[0],
                            state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                            state["cached_delta"].data_ptr() if "cached_delta" in state else None,
                            _memory(tau, name, "task vector")[0] if tau is not None else None))
        step = self._core(group).sharded_step(k, float(group["lr"]), tensors)

        # NCCL reduces only CUDA tensors (FSDP2 with CPU offload still has an NCCL group).
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" else torch.device("cpu")

        def refuse_together(error):
            # Every process learns whether any refused, so none waits in a
            # collective that another left, and none writes.
            refused = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
            dist.all_reduce(refused, group=pg)
            if refused.item():
                raise MergeCoreError(str(error) if error else f"another process refused step {k}; nothing was written on any process")

        def local(fn):
            try:
                return fn(), None
            except (MergeCoreError, ValueError) as e:
                return None, e

        def exchange_norms():
            blocks, error = local(step.norm_blocks)
            gathered = [None] * dist.get_world_size(pg)
            dist.all_gather_object(gathered, (None if error is None else str(error), blocks), group=pg)
            if error is not None or any(e is not None for e, _ in gathered):
                raise MergeCoreError(str(error) if error else f"another process refused step {k}; nothing was written on any process")
            step.set_norm_blocks([b for _, blocks in gathered for b in blocks])

        if step.needs_norms():
            exchange_norms()
        if step.trims():
            counts, error = local(step.histograms)
            refuse_together(error)
            while counts is not None:
                total = torch.tensor(counts, dtype=torch.int64, device=device)
                dist.all_reduce(total, group=pg)
                step.add_histograms(total.tolist())
                counts = step.histograms()
            if step.needs_norms():
                exchange_norms()
        refuse_together(step.check())
        step.write()
        for _, _, state in items:
            state["step"] = k

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the state keeps its dtypes (float32, and the packed task
        vector's uint8 bits): torch would cast it to each parameter's dtype, and a
        bf16 model's moments would lose their bits."""
        saved = state_dict["state"]
        self._bounds.clear()
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.detach().to(device="cpu", copy=True).contiguous()


class OnDAREAdamW(_MergingOptimizer):
    """OnDARE: AdamW whose update is DARE-sparsified (keep rate ``reserve_p``,
    rescaled by 1/p) and merged with the reference task vector τ' at weight
    ``alpha`` (when ``use_merge``); the L1 ``rescale`` with ``clip_val``; merging
    every ``online_step`` steps. Masks are keyed by (``seed``, name, step, index).

    ``variant``: ``"reference"`` (the official code) or ``"paper"``;
    ``adam_form``: ``"hf"`` (the official code's) or ``"torch"``.
    ``threads``: default ``torch.get_num_threads()``; the bits do not depend on it.
    ``shards={name: (numel, offset)}`` and ``process_group``: the parameters are
    this process's ranges of tensors sharded over torch.distributed, stepped with
    the single-process bits (see :mod:`merge_core.distributed`).
    """

    _method = "dare"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, no_deprecation_warning: bool = True,
                 reserve_p: float = 1.0, param_name_map: Optional[dict] = None, use_merge: bool = False,
                 alpha: float = 0.0, rescale: bool = False, clip_val: float = 1.0, online_step: int = 1, *,
                 param_names: Optional[Sequence[str]] = None, seed: int = 0, variant: str = "reference",
                 adam_form: str = "hf", threads: Optional[int] = None,
                 shards: Optional[dict] = None, process_group=None):
        del no_deprecation_warning  # accepted for drop-in compatibility; nothing is deprecated here
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         reserve_p=reserve_p, use_merge=use_merge, alpha=alpha, rescale=rescale, clip_val=clip_val,
                         online_step=online_step, param_names=param_names, param_name_map=param_name_map, seed=seed,
                         variant=variant, adam_form=adam_form, scope="tensor", threads=threads,
                         shards=shards, process_group=process_group)


class OnTIESAdamW(_MergingOptimizer):
    """OnTIES: AdamW whose update keeps its ``reserve_p`` largest magnitudes (exact
    top-k, lowest index first among ties) and is merged with τ' by sign election
    at weight ``alpha`` (when ``use_merge``); optional L1 ``rescale``; merging every
    ``online_step`` steps. ``scope``: ``"tensor"`` (the official code: each
    parameter its own top-k) or ``"global"`` (one threshold over all parameters
    of a group, in bytewise name order). ``variant``, ``adam_form``, ``threads``,
    ``shards`` and ``process_group`` as for :class:`OnDAREAdamW`.

    Per tensor and without ``rescale``, a step usually needs no copy of the
    update: a sample of it gives a bound that more than the kept elements
    reach, and only the elements at or above it are kept for the exact
    selection (the threshold, and so every bit, does not depend on the sample).
    Otherwise (global scope, ``rescale``, or an update that ties nearly
    everywhere) the step computes a float32 copy of the update, as large as the
    largest parameter (or as all of a group's with global scope).

    ``keep_scratch``: keep that copy, once made, and each thread's chunk
    buffers between steps instead of allocating them in each step. Memory that
    large is mapped fresh on every allocation (on Linux in 2 MiB pages where the
    kernel allows, which makes faulting it in several times cheaper than in
    4 KiB pages); kept, it is faulted in once and held between steps. Same bits
    either way. (Not used by a sharded step.)
    """

    _method = "ties"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, no_deprecation_warning: bool = True,
                 reserve_p: float = 1.0, param_name_map: Optional[dict] = None, use_merge: bool = False,
                 alpha: float = 0.0, rescale: bool = False, online_step: int = 1, *,
                 param_names: Optional[Sequence[str]] = None, seed: int = 0, variant: str = "reference",
                 adam_form: str = "hf", scope: str = "tensor", threads: Optional[int] = None,
                 shards: Optional[dict] = None, process_group=None, keep_scratch: bool = False):
        del no_deprecation_warning
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         reserve_p=reserve_p, use_merge=use_merge, alpha=alpha, rescale=rescale, clip_val=1.0,
                         online_step=online_step, param_names=param_names, param_name_map=param_name_map, seed=seed,
                         variant=variant, adam_form=adam_form, scope=scope, threads=threads,
                         shards=shards, process_group=process_group, keep_scratch=keep_scratch)


class AdamW(_MergingOptimizer):
    """Deterministic AdamW (``torch.optim.AdamW``'s defaults and form unless
    ``adam_form="hf"``): the same bits on every run and thread count."""

    _method = "adamw"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, param_names: Optional[Sequence[str]] = None,
                 adam_form: str = "torch", threads: Optional[int] = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=True,
                         reserve_p=1.0, use_merge=False, alpha=0.0, rescale=False, clip_val=1.0, online_step=1,
                         param_names=param_names, param_name_map=None, seed=0, variant="reference",
                         adam_form=adam_form, scope="tensor", threads=threads)


