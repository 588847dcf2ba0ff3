#!/usr/bin/env python3
"""Parity of `host merge` with mergekit 0.1.5 on small random Llama models.

Two modes:

  python3 scripts/merge_parity.py regenerate
      Builds the input models, the YAML files and mergekit's outputs under
      tests/fixtures/merge/ (what `cargo test -p host --test merge_cli` compares
      against, so CI needs no mergekit). Needs mergekit==0.1.5 (which pulls torch):
          python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5
          /tmp/mk/bin/python scripts/merge_parity.py regenerate

  python3 scripts/merge_parity.py compare [HOST_BINARY]
      Runs `host merge` on every fixture YAML and prints, per method, the largest
      relative error against mergekit's output and the number of differing
      elements (numpy and safetensors only; HOST_BINARY defaults to
      target/release/host).

The models: hidden 16, 3 layers (so gradients meet t = 0, 0.5, 1), 2 heads with one
KV head, MLP 32, vocab 48, float32. The base is N(0, 0.02); each fine-tune adds its
own N(0, 0.005) task vector, so signs conflict the way TIES expects.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "merge"

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB = 16, 3, 2, 1, 32, 48
HEAD_DIM = HIDDEN // HEADS

CONFIGS = {
    "linear": """\
merge_method: linear
models:
  - model: models/ft1
    parameters:
      weight: 0.5
  - model: models/ft2
    parameters:
      weight:
        - filter: mlp
          value: 0.1
        - value: 0.3
  - model: models/ft3
    parameters:
      weight: [0.2, 0.6]
dtype: float32
""",
    "task_arithmetic": """\
merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/ft1
    parameters:
      weight: 0.5
  - model: models/ft2
    parameters:
      weight: [0.3, 0.9, 0.1]
  - model: models/ft3
    parameters:
      weight: 0.4
parameters:
  lambda: 0.8
dtype: float32
""",
    "ties": """\
merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters:
      weight: 0.6
      density: 0.5
  - model: models/ft2
    parameters:
      weight: 0.3
      density:
        - filter: self_attn
          value: 0.25
        - value: 0.5
  - model: models/ft3
    parameters:
      weight: [0.2, 0.7]
      density: 0.75
dtype: float32
""",
    "ties_bf16_out": """\
merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters:
      weight: 1.0
      density: 0.5
  - model: models/ft2
    parameters:
      weight: 1.0
      density: 0.5
parameters:
  normalize: false
dtype: float32
out_dtype: bfloat16
""",
    "slerp": """\
merge_method: slerp
base_model: models/base
models:
  - model: models/base
  - model: models/ft1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - value: 0.3
dtype: float32
""",
    "dare_linear": """\
merge_method: dare_linear
base_model: models/base
models:
  - model: models/ft1
    parameters:
      weight: 1.0
      density: 0.5
dtype: float32
""",
    "dare_ties": """\
merge_method: dare_ties
base_model: models/base
models:
  - model: models/ft1
    parameters:
      weight: 0.5
      density: 0.5
  - model: models/ft2
    parameters:
      weight: 0.5
      density: 0.7
dtype: float32
""",
}

# DARE draws from torch's global RNG in mergekit: only statistics compare.
DETERMINISTIC = ["linear", "task_arithmetic", "ties", "ties_bf16_out", "slerp"]


def llama_tensors(rng, scale):
    t = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (HIDDEN,)
        t[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        t[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        t[p + "mlp.gate_proj.weight"] = (MLP, HIDDEN)
        t[p + "mlp.up_proj.weight"] = (MLP, HIDDEN)
        t[p + "mlp.down_proj.weight"] = (HIDDEN, MLP)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in t.items()}


def write_model(folder, tensors):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def regenerate():
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    rng = np.random.default_rng(20241)
    base = llama_tensors(rng, 0.02)
    write_model(FIXTURES / "models" / "base", base)
    for i in (1, 2, 3):
        tv = llama_tensors(rng, 0.005)
        write_model(FIXTURES / "models" / f"ft{i}", {k: (base[k] + tv[k]).astype(np.float32) for k in base})
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    for name, text in CONFIGS.items():
        (FIXTURES / f"{name}.yml").write_text(text)
        out = FIXTURES / "mergekit" / name
        subprocess.run(
            [mergekit, f"{name}.yml", str(out.relative_to(FIXTURES)), "--no-write-model-card", "--random-seed", "1", "--quiet"],
            cwd=FIXTURES,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        # Only the weights are compared; mergekit's copies of config files would be noise.
        for f in out.iterdir():
            if f.name != "model.safetensors":
                f.unlink()
    import mergekit

    (FIXTURES / "README.md").write_text(
        "Made by `scripts/merge_parity.py regenerate` with mergekit "
        + getattr(mergekit, "__version__", "0.1.5")
        + ": input models under `models/`, the YAML files, and mergekit's merged weights under `mergekit/`.\n"
        "`cargo test -p host --test merge_cli` compares `host merge` against them.\n"
    )
    print(f"fixtures written to {FIXTURES}")


def load_file(path):
    """Every tensor of a safetensors file as float32 (bfloat16 widened exactly);
    numpy has no bfloat16."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        buf = data[lo:hi]
        if info["dtype"] == "F32":
            a = np.frombuffer(buf, dtype="<f4")
        elif info["dtype"] == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F16":
            a = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name}: dtype {info['dtype']}")
        out[name] = a.reshape(info["shape"])
    return out


def compare(host):
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'config':<16} {'max rel err':>12} {'elements differing':>20}")
        for name in CONFIGS:
            out = Path(tmp) / name
            subprocess.run([host, "merge", f"{name}.yml", str(out), "--backend", "cpu", "--seed", "1"], cwd=FIXTURES, check=True,
                           stdout=subprocess.DEVNULL)
            ours = load_file(str(out / "model.safetensors"))
            theirs = load_file(str(FIXTURES / "mergekit" / name / "model.safetensors"))
            worst, differing, total = 0.0, 0, 0
            for k, y in theirs.items():
                x = ours[k]
                xf, yf = x.astype(np.float64), y.astype(np.float64)
                worst = max(worst, float(np.max(np.abs(xf - yf)) / max(np.max(np.abs(yf)), 1e-30)))
                differing += int(np.sum(x != y))
                total += y.size
            note = "" if name in DETERMINISTIC else "  (random masks: not comparable element-wise)"
            print(f"{name:<16} {worst:>12.3e} {differing:>10} of {total:<8}{note}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "regenerate":
        regenerate()
    elif len(sys.argv) >= 2 and sys.argv[1] == "compare":
        compare(os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else str(ROOT / "target" / "release" / "host"))
    else:
        print(__doc__)
        sys.exit(2)
