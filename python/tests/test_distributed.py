"""The same bits on 1, 2 or 3 processes: a tiny Llama trained with the optimizer
state sharded over torch.distributed (gloo, spawned CPU processes), OnDARE and
OnTIES in both scopes with and without the rescale; a checkpoint saved on 2
processes resumes on 3 as if never interrupted; a refusal on one process writes
nothing anywhere."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from merge_core import MergeCoreError, OnDAREAdamW, OnTIESAdamW
from merge_core import distributed as mcd

CONFIGS = {
    "dare": (OnDAREAdamW, {}),
    "dare-rescale": (OnDAREAdamW, {"rescale": True, "clip_val": 1e-3}),
    "ties": (OnTIESAdamW, {}),
    "ties-rescale": (OnTIESAdamW, {"rescale": True}),
    "ties-global": (OnTIESAdamW, {"scope": "global"}),
    "ties-global-rescale": (OnTIESAdamW, {"scope": "global", "rescale": True}),
}
STEPS = 4


def llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def models():
    base = llama(0)
    sft = copy.deepcopy(base)
    with torch.no_grad():
        for i, p in enumerate(sft.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-2)
    return base, sft


class Sharded:
    """A replicated model whose optimizer holds this process's range of every parameter."""

    def __init__(self, config, base, sft, rank, world):
        self.model, self.rank, self.world = copy.deepcopy(sft), rank, world
        cls, kw = CONFIGS[config]
        self.ranges, local, shards = {}, [], {}
        for name, p in self.model.named_parameters():
            offset, length = mcd.shard_range(p.numel(), rank, world)
            self.ranges[name] = (p, offset, length)
            local.append((name, torch.nn.Parameter(p.data.view(-1)[offset:offset + length])))
            shards[name] = (p.numel(), offset)
        self.local = dict(local)
        self.opt = cls(local, lr=1e-3, reserve_p=0.3, use_merge=True, alpha=0.05, seed=9, shards=shards, **kw)
        self.opt.init_ref_param_diff(sft, base)

    def step(self, k, poison=False):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 + k))
        self.model.zero_grad(set_to_none=True)
        self.model(input_ids=ids, labels=ids).loss.backward()
        for name, (p, offset, length) in self.ranges.items():
            self.local[name].grad = p.grad.view(-1)[offset:offset + length].clone()
        if poison:
            self.local["model.norm.weight"].grad[0] = float("nan")
        self.opt.step()
        # Every process's new range to every process (the all-gather of ZeRO/FSDP).
        for p, _, _ in self.ranges.values():
            for r in range(self.world):
                offset, length = mcd.shard_range(p.numel(), r, self.world)
                if length:
                    dist.broadcast(p.data.view(-1)[offset:offset + length], src=r)


def worker(rank, world, port, mode, out, ckpt):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    base, sft = models()
    results = {}
    if mode == "train":
        for config in CONFIGS:
            run = Sharded(config, base, sft, rank, world)
            for k in range(STEPS):
                run.step(k)
            results[config] = run.model.state_dict()
        # A NaN gradient on one process: every process refuses, none writes.
        run = Sharded("dare-rescale", base, sft, rank, world)
        run.step(0)
        before = copy.deepcopy(run.model.state_dict())
        try:
            run.step(1, poison=(rank == world - 1))
            results["refusal"] = "stepped"
        except MergeCoreError as e:
            same = all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
            results["refusal"] = (str(e), same)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for config in ("dare-rescale", "ties-global-rescale"):
            model = copy.deepcopy(sft)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            cls, kw = CONFIGS[config]
            opt = cls(model.named_parameters(), lr=1e-3, reserve_p=0.3, use_merge=True, alpha=0.05, seed=9, **kw)
            assert opt.shards is not None
            opt.init_ref_param_diff(sft, base)
            for k in range(STEPS):
                # The same batch on every process: FSDP's averaged gradient is then
                # each process's own (x + x = 2x and 2x / 2 are exact).
                ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 + k))
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
            results[config] = {n: p.full_tensor() for n, p in model.named_parameters()}
    elif mode == "save":
        run = Sharded("ties-global-rescale", base, sft, rank, world)
        for k in range(2):
            run.step(k)
        mcd.save(run.opt, ckpt)
        if rank == 0:
            torch.save(run.model.state_dict(), f"{ckpt}/model.pt")
    elif mode == "resume":
        run = Sharded("ties-global-rescale", base, sft, rank, world)
        run.model.load_state_dict(torch.load(f"{ckpt}/model.pt"))
        mcd.load(run.opt, ckpt)
        for k in range(2, STEPS):
            run.step(k)
        results["resumed"] = run.model.state_dict()
    torch.save(results, f"{out}.rank{rank}")
    dist.destroy_process_group()


def spawn(world, mode, out, ckpt=""):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, mode, str(out), str(ckpt)), nprocs=world, join=True)
    return [torch.load(f"{out}.rank{r}") for r in range(world)]


def bits_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return {world: spawn(world, "train", tmp / f"train{world}") for world in (1, 2, 3)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_two_and_three_processes_give_the_same_weights(runs, config):
    one = runs[1][0][config]
    assert not bits_equal(one, llama(0).state_dict())
    for world in (2, 3):
        for rank, result in enumerate(runs[world]):
            assert bits_equal(one, result[config]), f"{config}: world {world}, rank {rank} differs from one process"


def test_a_refusal_on_one_process_writes_nothing_anywhere(runs):
    for world in (2, 3):
        results = [r["refusal"] for r in runs[world]]
        assert all(isinstance(r, tuple) and r[1] for r in results), results
        assert "non-finite gradient" in results[-1][0] and "model.norm.weight" in results[-1][0]
        assert all("another process refused" in r[0] for r in results[:-1])


def test_a_checkpoint_saved_on_two_processes_resumes_on_three(runs, tmp_path):
    spawn(2, "save", tmp_path / "save", tmp_path / "ckpt")
    resumed = spawn(3, "resume", tmp_path / "resume", tmp_path / "ckpt")
    straight = runs[1][0]["ties-global-rescale"]
    for rank, result in enumerate(resumed):
        assert bits_equal(straight, result["resumed"]), f"rank {rank}"


@pytest.mark.parametrize("config", ["dare-rescale", "ties-rescale", "ties-global-rescale"])
def test_the_sharded_step_on_one_process_is_the_plain_step(runs, config):
    base, sft = models()
    model = copy.deepcopy(sft)
    cls, kw = CONFIGS[config]
    opt = cls(model.named_parameters(), lr=1e-3, reserve_p=0.3, use_merge=True, alpha=0.05, seed=9, threads=2, **kw)
    opt.init_ref_param_diff(sft, base)
    torch.set_num_threads(1)
    for k in range(STEPS):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 + k))
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert bits_equal(model.state_dict(), runs[1][0][config])


def test_fsdp2_fully_shard_gives_the_single_process_bits(runs, tmp_path):
    """FSDP2 on 2 processes: the optimizer finds each DTensor's range itself. (At
    3 processes FSDP's own gradient average, (x + x + x) / 3, is not exactly x,
    so the explicit ranges above carry the uneven case.)"""
    fsdp = spawn(2, "fsdp", tmp_path / "fsdp")
    for config in ("dare-rescale", "ties-global-rescale"):
        for rank, result in enumerate(fsdp):
            assert bits_equal(runs[1][0][config], result[config]), f"{config}: rank {rank}"
