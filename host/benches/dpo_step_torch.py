"""The DPO step `host bench` times, in PyTorch: transformers' LlamaForCausalLM in
float32 with eager attention and TF32 off, the same shapes, the same batch
(2 x pairs sequences of `seq` tokens, prompt a quarter), reference log-probs
computed once up front, the sigmoid loss (beta 0.1) and torch.optim.AdamW.
`--objective pretrain` times the pretraining step instead: the same sequences,
the mean next-token cross-entropy over every token after the first, AdamW.
Prints the median step time after one warm-up step, tokens per second, the
process's peak resident memory and, on CUDA, the peak device memory of the step.
`host bench --torch PYTHON` runs it beside its own step and prints the ratios.

    python host/benches/dpo_step_torch.py --shape smollm2-135m --seq 512 --pairs 4 --device cuda
    python host/benches/dpo_step_torch.py --shape tiny --seq 64 --pairs 2 --device cpu

Needs torch and transformers (python/requirements-torch.txt). `--deterministic`
adds torch.use_deterministic_algorithms(True), the setting under which PyTorch
repeats its own bits run to run.
"""

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "tiny": dict(vocab_size=259, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048),
}


def sequence_logps(model, ids, mask):
    """Summed log-probs of the scored tokens (mask[t] scores token t from position t - 1)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", help=f"{', '.join(sorted(SHAPES))}, or a config.json (as host bench takes)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--objective", choices=("dpo", "pretrain"), default="dpo")
    ap.add_argument("--deterministic", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if a.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    dev = torch.device(a.device)
    torch.manual_seed(1)
    if a.shape in SHAPES:
        config = LlamaConfig(**SHAPES[a.shape], rms_norm_eps=1e-5, attn_implementation="eager")
    else:
        config = LlamaConfig.from_json_file(a.shape)
        config._attn_implementation = "eager"
    policy = LlamaForCausalLM(config).to(dev, torch.float32)
    dpo = a.objective == "dpo"

    g = torch.Generator().manual_seed(0x5EED)
    prompt_len = max(a.seq // 4, 1)
    prompts = torch.randint(0, config.vocab_size, (a.pairs, prompt_len), generator=g)
    chosen = torch.cat([prompts, torch.randint(0, config.vocab_size, (a.pairs, a.seq - prompt_len), generator=g)], 1)
    rejected = torch.cat([prompts, torch.randint(0, config.vocab_size, (a.pairs, a.seq - prompt_len), generator=g)], 1)
    ids = torch.cat([chosen, rejected]).to(dev)
    mask = torch.zeros_like(ids, dtype=torch.float32)
    if dpo:
        mask[:, prompt_len:] = 1.0
        reference = LlamaForCausalLM(config).to(dev, torch.float32)
        reference.load_state_dict(policy.state_dict())
        reference.eval()
        with torch.no_grad():
            ref = sequence_logps(reference, ids, mask)
        del reference
    else:
        mask[:, 1:] = 1.0
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps + 1):
        sync()
        t = time.perf_counter()
        logps = sequence_logps(policy, ids, mask)
        if dpo:
            pi = logps[: a.pairs] - logps[a.pairs:]
            rf = ref[: a.pairs] - ref[a.pairs:]
            loss = -F.logsigmoid(0.1 * (pi - rf)).mean()
        else:
            loss = -logps.sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step > 0:
            times.append(time.perf_counter() - t)
    tokens = 2 * a.pairs * a.seq
    step_s = statistics.median(times)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"PyTorch {torch.__version__} {'DPO' if dpo else 'pretraining'} step, {a.shape} ({n_params} parameters), {tokens} tokens per step, "
          f"median of {a.steps} steps after 1 warm-up, device {a.device}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f" ({torch.get_num_threads()} threads)"))
    line = f"torch  step ms {step_s * 1e3:.1f}  tokens/s {tokens / step_s:.1f}"
    if dev.type == "cuda":
        line += f"  peak memory {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB"
    # the whole process's peak (Linux reports KiB), as `host bench` reports its own
    line += f"  peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    print(line, flush=True)


if __name__ == "__main__":
    main()
