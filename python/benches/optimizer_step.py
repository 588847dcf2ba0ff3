#!/usr/bin/env python3
"""CPU optimizer-step benchmark, all sides in one run on the same tensors and cores:
merge_core's AdamW / OnDARE / OnTIES against torch.optim.AdamW (foreach, fused)
and a port of the official ODAdamW / OTAdamW step (gpu-shaders/bench/official_torch.py).

Each configuration is timed on 1 and 2 threads (torch.set_num_threads and the
optimizer's threads=), interleaved, as the minimum over --repeat steps; memory is
the optimizer state's bytes beyond AdamW's two moments, as a share of the
parameter bytes. Each set ends with the ratios issue 13 sets targets for, of
the minima above.

--grads fixed (the default) steps every time with the same gradient, so from the
second step on Adam's update is nearly one magnitude (m/sqrt(v) is about the
gradient's sign): the OnTIES select's worst case, every key pass counting almost
every element. --grads drawn gives each timed step a gradient drawn afresh (two
sets alternate, drawn before any timing), as training does: the update's
magnitudes spread, and the select's later passes see few candidates. The
other optimizers' costs do not depend on the values.

usage: python python/benches/optimizer_step.py [--sets 16m,16m-47,110m] [--repeat 5] [--grads fixed|drawn]
"""

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "gpu-shaders" / "bench"))
from official_torch import OfficialStep  # noqa: E402

from merge_core import AdamW, OnDAREAdamW, OnTIESAdamW  # noqa: E402
from merge_core.optim import _pack_bits  # noqa: E402


def llama_shapes(hidden, mlp, layers, vocab):
    shapes = [("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes += [(pre + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(pre + f"mlp.{x}_proj.weight", (mlp, hidden)) for x in ("gate", "up")]
        shapes += [(pre + "mlp.down_proj.weight", (hidden, mlp)), (pre + "input_layernorm.weight", (hidden,)),
                   (pre + "post_attention_layernorm.weight", (hidden,))]
    return shapes


SETS = {
    # 16M parameters as one tensor, and 17M as 47 model-shaped tensors.
    "16m": [("w", (4096, 4096))],
    "16m-47": llama_shapes(512, 1024, 5, 4096),
    # The 110M Llama of the CPU-training benchmark (hidden 768, 12 layers, vocab
    # 32000), here with an untied lm_head: 134M.
    "110m": llama_shapes(768, 2048, 12, 32000),
}

HYPER = dict(lr=1e-6, reserve_p=0.01, alpha=1e-7)


def tensors(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def ours(kind, shapes, threads):
    params = tensors(shapes)
    named = [(n, p) for (n, _), p in zip(shapes, params)]
    if kind == "adamw":
        opt = AdamW(named, lr=HYPER["lr"], weight_decay=0.0, adam_form="hf", threads=threads)
    else:
        if kind == "dare":
            opt = OnDAREAdamW(named, lr=HYPER["lr"], reserve_p=HYPER["reserve_p"], use_merge=True, alpha=HYPER["alpha"], seed=1, threads=threads)
        else:
            opt = OnTIESAdamW(named, lr=HYPER["lr"], reserve_p=HYPER["reserve_p"], use_merge=True, alpha=HYPER["alpha"], seed=1, threads=threads,
                              keep_scratch=kind == "ties-keep")
        g = torch.Generator().manual_seed(2)
        for p in params:  # a task vector as init_ref_param_diff leaves it: reserve_p of it stored, packed
            tau = (torch.randn(p.shape, generator=g) * 1e-3).view(-1)
            tau[torch.rand(tau.shape, generator=g) >= HYPER["reserve_p"]] = 0.0
            stored = tau.view(torch.int32) != 0
            state = opt._state_of(p)
            state["tau_ref_stored"], state["tau_ref_values"] = _pack_bits(stored), tau[stored].clone()
    return opt.step, params, opt


def torch_adamw(fused, shapes):
    params = tensors(shapes)
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], weight_decay=0.0, fused=fused, foreach=not fused)
    return opt.step, params, opt


def official(kind, shapes):
    params = tensors(shapes)
    taus = [torch.randn(p.shape) * 1e-3 for p in params]
    o = OfficialStep([p.data for p in params], taus, kind, lr=HYPER["lr"], p=HYPER["reserve_p"], alpha=HYPER["alpha"])
    return (lambda: o.step([p.grad for p in params])), params, o


def extra_state_share(opt, params):
    """Optimizer bytes held between steps beyond AdamW's exp_avg and exp_avg_sq
    (with keep_scratch, the kept update too), per parameter byte."""
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    if isinstance(opt, OfficialStep):
        total = sum(t.numel() * t.element_size() for t in opt.m + opt.v + (opt.tau or []))
    else:
        total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        total += opt._scratch.nbytes if getattr(opt, "_scratch", None) is not None else 0
    return (total - 2 * param_bytes) / param_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="16m,16m-47,110m")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--grads", choices=("fixed", "drawn"), default="fixed")
    args = ap.parse_args()
    for name in args.sets.split(","):
        shapes = SETS[name]
        n = sum(torch.Size(s).numel() for _, s in shapes)
        drawn = None
        if args.grads == "drawn":
            g = torch.Generator().manual_seed(3)
            drawn = [[torch.randn(s, generator=g) * 1e-3 for _, s in shapes] for _ in range(2)]
        print(f"\n{name}: {n / 1e6:.1f}M float32 parameters in {len(shapes)} tensors, minimum of {args.repeat} steps, "
              f"{'a gradient drawn per step' if drawn else 'the same gradient every step'}")
        print(f"  {'optimizer':<38}{'1 thread':>12}{'2 threads':>12}   state beyond AdamW")
        rows = [
            ("torch AdamW foreach", lambda t: torch_adamw(False, shapes)),
            ("torch AdamW fused", lambda t: torch_adamw(True, shapes)),
            ("merge_core AdamW", lambda t: ours("adamw", shapes, t)),
            ("official ODAdamW (port)", lambda t: official("dare", shapes)),
            ("merge_core OnDAREAdamW", lambda t: ours("dare", shapes, t)),
            ("official OTAdamW (port)", lambda t: official("ties", shapes)),
            ("merge_core OnTIESAdamW", lambda t: ours("ties", shapes, t)),
            ("merge_core OnTIESAdamW, keep_scratch", lambda t: ours("ties-keep", shapes, t)),
        ]
        best_of = {}
        for label, make in rows:
            times, share = [], None
            for threads in (1, 2):
                torch.set_num_threads(threads)
                run, params, opt = make(threads)
                run()  # first step allocates the state
                share = extra_state_share(opt, params)
                best = float("inf")
                for i in range(args.repeat):
                    if drawn is not None:
                        for p, grad in zip(params, drawn[i % 2]):
                            p.grad = grad
                    t0 = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - t0)
                times.append(best * 1e3)
                del run, params, opt
            print(f"  {label:<38}{times[0]:10.1f}ms{times[1]:10.1f}ms   {share * 100:+6.0f}%", flush=True)
            best_of[label] = times
        # Issue 13's targets, as ratios of the minima above (same run, same tensors).
        print(f"  {'ratio (target)':<38}{'1 thread':>12}{'2 threads':>12}")
        for what, num, den in [
            ("OnDARE / torch fused (<= 3x)", "merge_core OnDAREAdamW", "torch AdamW fused"),
            ("official ODAdamW / OnDARE (>= 5x)", "official ODAdamW (port)", "merge_core OnDAREAdamW"),
            ("official OTAdamW / OnTIES (>= 10x)", "official OTAdamW (port)", "merge_core OnTIESAdamW"),
            ("OnTIES / OnDARE (<= 2x)", "merge_core OnTIESAdamW", "merge_core OnDAREAdamW"),
        ]:
            ratios = [a / b for a, b in zip(best_of[num], best_of[den])]
            print(f"  {what:<38}{ratios[0]:11.2f}x{ratios[1]:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
