#!/usr/bin/env python3
"""Wall time and peak memory of `host merge` beside mergekit, in one run.

    python3 scripts/merge_bench.py [HOST_BINARY] [--workdir DIR] [--params-m 106]

Builds three random Llama models of about 100M float32 parameters each (a base
and two fine-tunes: hidden 768, 8 layers, MLP 2048, vocab 32000, untied head; 424
MB each), then runs a TIES and a DARE-TIES merge of them with mergekit-yaml
(mergekit 0.1.5, CPU, default options, --random-seed 1) and with `host merge
--backend cpu`, alternating, and prints wall seconds and peak RSS (the child's
`ru_maxrss`, from GNU time, /usr/bin/time) for each, and the ratios. HOST_BINARY defaults to
target/release/host; build it first (`cargo build --release -p host`). Needs numpy,
safetensors and mergekit in the running Python:

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5
    /tmp/mk/bin/python scripts/merge_bench.py

Needs about 3 GB of disk in the work directory (default: a temporary one).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

TIES = """\
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ft2
    parameters: {weight: 0.4, density: 0.3}
dtype: float32
"""

DARE_TIES = TIES.replace("merge_method: ties", "merge_method: dare_ties")


def build(folder, rng, hidden, layers, mlp, vocab, base=None):
    from safetensors.numpy import save_file

    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + n + ".weight"] = (hidden,)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + "self_attn." + n + ".weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (mlp, hidden)
        shapes[p + "mlp.up_proj.weight"] = (mlp, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, mlp)
    tensors = {}
    for k, s in shapes.items():
        x = rng.standard_normal(s, dtype=np.float32) * np.float32(0.02 if base is None else 0.002)
        tensors[k] = x if base is None else (base[k] + x)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return tensors, sum(int(np.prod(s)) for s in shapes.values())


def run(cmd, cwd):
    """Wall seconds and peak RSS (MB) of one command, measured by GNU time: its own
    child's wait4 rusage. (wait4 on a child forked from this Python process would
    count this process's pages, inherited at fork, into the child's peak.)"""
    with tempfile.NamedTemporaryFile("r") as stats:
        p = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%e %M"] + cmd, cwd=cwd, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.decode(errors='replace')[-3000:]}")
        wall, kb = stats.read().split()[-2:]
    return float(wall), int(kb) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host", nargs="?", default=str(ROOT / "target" / "release" / "host"))
    ap.add_argument("--workdir")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    host = os.path.abspath(args.host)
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    rng = np.random.default_rng(1)
    dims = dict(hidden=768, layers=8, mlp=2048, vocab=32000)
    base, n = build(work / "base", rng, **dims)
    build(work / "ft1", rng, base=base, **dims)
    build(work / "ft2", rng, base=base, **dims)
    del base
    (work / "ties.yml").write_text(TIES)
    (work / "dare_ties.yml").write_text(DARE_TIES)
    print(f"3 models of {n / 1e6:.1f}M float32 parameters ({n * 4 / 1e6:.0f} MB each), {os.cpu_count()} CPUs, {args.reps} alternating runs, minimum shown")
    print(f"{'merge':<10} {'tool':<9} {'wall s':>8} {'peak RSS MB':>12}")
    for name in ("ties", "dare_ties"):
        best = {}
        for rep in range(args.reps):
            for tool, cmd in (
                ("mergekit", [mergekit, f"{name}.yml", f"out-mk-{name}", "--no-write-model-card", "--random-seed", "1", "--quiet"]),
                ("host", [host, "merge", f"{name}.yml", f"out-host-{name}", "--backend", "cpu", "--seed", "1"]),
            ):
                shutil.rmtree(work / cmd[2] if tool == "mergekit" else work / cmd[3], ignore_errors=True)
                wall, rss = run(cmd, work)
                w0, r0 = best.get(tool, (float("inf"), float("inf")))
                best[tool] = (min(w0, wall), min(r0, rss))
        for tool in ("mergekit", "host"):
            print(f"{name:<10} {tool:<9} {best[tool][0]:>8.2f} {best[tool][1]:>12.0f}")
        print(f"{name:<10} {'ratio':<9} {best['mergekit'][0] / best['host'][0]:>7.2f}x {best['mergekit'][1] / best['host'][1]:>11.2f}x  (mergekit / host)")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
