#!/usr/bin/env python3
"""A port of the official ODAdamW / OTAdamW optimizer step (Lu et al. 2024), written
from SPEC.md's reference variant, for timing next to the wgpu kernels on the same
GPU. Like the official code it loops over tensors in Python, draws DARE masks
dropout-style (F.dropout), trims TIES by argsort per tensor and keeps the task
vector densely. It is a timing baseline, not a bit-exact reference.

usage: official_torch.py [--sizes 16,64] [--qwen] [--steps 10]
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

QWEN = dict(hidden=2048, mlp=5504, layers=24, vocab=151936)


def qwen_shapes():
    h, m, L, V = QWEN["hidden"], QWEN["mlp"], QWEN["layers"], QWEN["vocab"]
    shapes = [(V, h), (V, h)]  # embed_tokens, lm_head (untied)
    for _ in range(L):
        shapes += [(h, h)] * 4 + [(m, h), (m, h), (h, m), (h,), (h,)]
    return shapes


class OfficialStep:
    """State and step of ODAdamW (kind='dare') / OTAdamW (kind='ties') / AdamW."""

    def __init__(self, params, taus, kind, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, wd=0.0,
                 p=0.01, alpha=1e-7, rescale=False, clip=1.0):
        self.params, self.kind = params, kind
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.p, self.alpha, self.rescale, self.clip = p, alpha, rescale, clip
        self.m = [torch.zeros_like(x) for x in params]
        self.v = [torch.zeros_like(x) for x in params]
        self.t = 0
        if kind == "dare":
            # tau' = clamp(dropout(tau), -c, c), stored densely as the official code does.
            self.tau = [torch.clamp(F.dropout(t, p=1 - p), -clip, clip) for t in taus]
        elif kind == "ties":
            self.tau = [self.trim(t) for t in taus]
        else:
            self.tau = None

    def trim(self, x):
        flat = x.flatten()
        k = max(1, math.ceil(self.p * flat.numel()))
        idx = torch.argsort(flat.abs(), descending=True)[:k]
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[idx] = True
        return (flat * mask).view_as(x)

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for i, (x, g) in enumerate(zip(self.params, grads)):
            m, v = self.m[i], self.v[i]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            delta = -step_size * (m / (v.sqrt().add_(self.eps)))
            if self.kind == "dare":
                new = F.dropout(delta, p=1 - self.p)
                if self.rescale:
                    org_l1, new_l1 = delta.abs().sum(), new.abs().sum()
                    if org_l1 >= 1e-8:
                        new = torch.clamp(new * (org_l1 / (new_l1 + self.eps)), -self.clip, self.clip)
                x.add_(self.tau[i], alpha=self.alpha)
                x.add_(new, alpha=1 - self.alpha)
            elif self.kind == "ties":
                new = self.trim(delta)
                tau = self.tau[i]
                s = torch.where(tau + new >= 0, 1.0, -1.0)
                x.add_(tau * (torch.sign(tau) == s), alpha=self.alpha)
                x.add_(new * (torch.sign(new) == s), alpha=1 - self.alpha)
            else:
                x.add_(delta)
            if self.wd:
                x.add_(x, alpha=-self.lr * self.wd)


def bench(label, shapes, kind, steps, **kw):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dev = "cuda"
    params = [torch.randn(s, device=dev) * 0.02 for s in shapes]
    taus = [torch.randn(s, device=dev) * 1e-3 for s in shapes] if kind in ("dare", "ties") else None
    grads = [torch.randn(s, device=dev) * 1e-3 for s in shapes]
    n = sum(x.numel() for x in params)
    if kind.startswith("torch"):
        for x, g in zip(params, grads):
            x.grad = g
        # weight_decay=0 as the port (and the official code) defaults; torch.optim.AdamW defaults to 0.01.
        opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=(kind == "torch-fused"), foreach=(kind == "torch-foreach"))
        run = opt.step
    else:
        o = OfficialStep(params, taus, kind, **kw)
        del taus
        run = lambda: o.step(grads)
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        run()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {label:<44} {ms:10.3f} ms/step  peak {peak:6.1f} GiB  ({n/1e9:.3f}B params, {len(shapes)} tensors)")
    del params, grads
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64")
    ap.add_argument("--qwen", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    sets = [(f"{mi}M single tensor", [(mi << 20,)]) for mi in map(int, a.sizes.split(","))]
    if a.qwen:
        sets.append(("Qwen1.5-1.8B shapes", qwen_shapes()))
    for name, shapes in sets:
        print(name)
        bench("torch AdamW fused", shapes, "torch-fused", a.steps)
        bench("torch AdamW foreach", shapes, "torch-foreach", a.steps)
        bench("official ODAdamW (OnDARE)", shapes, "dare", a.steps)
        bench("official ODAdamW + L1 rescale", shapes, "dare", a.steps, rescale=True)
        bench("official OTAdamW (OnTIES)", shapes, "ties", max(1, a.steps // 5))


if __name__ == "__main__":
    main()
