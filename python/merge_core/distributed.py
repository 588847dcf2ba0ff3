"""The same bits on 1 process or N: sharded optimizer state with torch.distributed.

Each process holds a contiguous range of every parameter's flattened elements
and steps it. With FSDP2 (``fully_shard``) the parameters are DTensors sharded on
dim 0 and the optimizer finds the ranges and the process group itself::

    fully_shard(model)  # after fully_shard on each layer
    opt = OnDAREAdamW(model.named_parameters(), ...)

Otherwise (a ZeRO partition, :func:`shard_range`'s even split) give, for each
parameter name, the tensor's element count and the range's first global index::

    opt = OnDAREAdamW(local_named_params, ..., shards={name: (numel, offset)})

The step then uses global indices for every mask, joins the L1 norms of the
rescale from exact subtree sums of the fixed tree, and selects the OnTIES
threshold from radix-select histograms summed with ``all_reduce`` (integers), so
the weights are those of one process, bit for bit, for every world size.
docs/DISTRIBUTED.md has the protocol and its cost.

Checkpoints: :func:`save` writes one file per process with each range's global
offset; :func:`load` reads every file and cuts the ranges this process holds now,
so a state saved on N processes resumes on M.
"""

from __future__ import annotations

import os
import pathlib
import re

import torch
import torch.distributed as dist

from .optim import _local

__all__ = ["shard_range", "save", "load"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "cached_delta", "tau_ref")


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """(offset, length) of ``rank``'s range when ``numel`` elements are split into
    ``world`` contiguous ranges of ``ceil(numel / world)`` (the last ones shorter
    or empty), as FSDP2 splits dim 0 of a tensor."""
    per = -(-numel // world)
    lo = min(rank * per, numel)
    return lo, min(lo + per, numel) - lo


def _file(directory: pathlib.Path, rank: int, world: int) -> pathlib.Path:
    return directory / f"optimizer-rank{rank:05d}-of-{world:05d}.pt"


def save(optimizer, directory, group=None) -> None:
    """Writes this process's optimizer ranges (atomically: a temporary file, then
    a rename) and waits for every process."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ranges = {}
    for p, name in optimizer._named():
        full, offset = optimizer.shards[name]
        state = optimizer.state.get(p, {})
        ranges[name] = {
            "numel": full,
            "offset": offset,
            "length": _local(p).numel(),
            "step": state.get("step", 0),
            "state": {k: state[k].detach().clone() for k in _STATE_KEYS if k in state},
        }
    path = _file(directory, rank, world)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": "merge-core-sharded-optimizer/1", "world": world, "rank": rank, "ranges": ranges}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dist.barrier(group)


def load(optimizer, directory) -> None:
    """Fills this process's optimizer state from a checkpoint saved at any world
    size: every saved range that overlaps a range held now is copied in."""
    directory = pathlib.Path(directory)
    files = sorted(directory.glob("optimizer-rank*-of-*.pt"))
    worlds = {int(re.search(r"-of-(\d+)\.pt$", f.name).group(1)) for f in files}
    if len(worlds) != 1:
        raise ValueError(f"{directory}: expected the files of one save, found world sizes {sorted(worlds)}")
    (world,) = worlds
    if len(files) != world:
        raise ValueError(f"{directory}: {len(files)} of the {world} files of the save")
    saved = [torch.load(f, weights_only=True) for f in files]
    for p, name in optimizer._named():
        full, offset = optimizer.shards[name]
        length = _local(p).numel()
        pieces = [(s["ranges"][name], f) for s, f in zip(saved, files) if name in s["ranges"]]
        if not pieces:
            raise KeyError(f"parameter `{name}` is not in the checkpoint {directory}")
        state = optimizer._state_of(p)
        covered = 0
        for piece, f in pieces:
            if piece["numel"] != full:
                raise ValueError(f"{f}: parameter `{name}` has {piece['numel']} elements there, {full} now")
            lo, hi = max(offset, piece["offset"]), min(offset + length, piece["offset"] + piece["length"])
            if lo >= hi:
                continue
            covered += hi - lo
            state["step"] = piece["step"]
            for key, value in piece["state"].items():
                if key not in state:
                    state[key] = torch.zeros(_local(p).shape, dtype=torch.float32)
                state[key].view(-1)[lo - offset:hi - offset] = value.view(-1)[lo - piece["offset"]:hi - piece["offset"]]
        if covered != length:
            raise ValueError(f"{directory}: parameter `{name}`: the saved ranges cover {covered} of this process's {length} elements")
