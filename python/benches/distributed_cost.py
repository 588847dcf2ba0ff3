#!/usr/bin/env python3
"""What the sharded step exchanges per optimizer step, computed from a model's
shapes, against what FSDP itself moves in the same step (docs/DISTRIBUTED.md).

Counts are exact for the protocol in python/src/shard.rs: the norm blocks are
the maximal aligned blocks of each rank's range (as merge_core.distributed
exchanges them: pickled lists through all_gather_object, measured here by
pickling them), the OnTIES histograms are int64 counts of the three key passes
(2048, 2048 and 512 buckets; index passes only when the threshold's magnitude
ties across the cut, which the step reports in no extra pass otherwise).

usage: python python/benches/distributed_cost.py [--ranks 64] [--model qwen1.5-7b]
"""

import argparse
import pickle

MODELS = {
    # Qwen1.5-7B's config.json: hidden 4096, intermediate 11008, 32 layers, 32
    # heads (no GQA), vocab 151936, biases on q/k/v, untied embeddings.
    "qwen1.5-7b": dict(hidden=4096, mlp=11008, layers=32, vocab=151936, kv=4096, qkv_bias=True),
}
KEY_PASS_BUCKETS = (2048, 2048, 512)


def shapes(m):
    h, f, kv = m["hidden"], m["mlp"], m["kv"]
    out = [("model.embed_tokens.weight", (m["vocab"], h)), ("lm_head.weight", (m["vocab"], h)), ("model.norm.weight", (h,))]
    for i in range(m["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h))]
        if m["qkv_bias"]:
            out += [(p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.v_proj.bias", (kv,))]
        out += [(p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out


def fsdp_range(shape, rank, ranks):
    """FSDP2's Shard(0): dim 0 split into chunks of ceil(rows / ranks) rows."""
    rows = shape[0]
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    chunk = -(-rows // ranks)
    lo = min(rank * chunk, rows)
    hi = min(lo + chunk, rows)
    return lo * per_row, hi * per_row


def dyadic_blocks(start, end):
    out = []
    while start < end:
        level = 0
        while start % (1 << (level + 1)) == 0 and start + (1 << (level + 1)) <= end:
            level += 1
        out.append((start, level))
        start += 1 << level
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--model", default="qwen1.5-7b", choices=sorted(MODELS))
    args = ap.parse_args()
    N, tensors = args.ranks, shapes(MODELS[args.model])
    params = 0
    for _, s in tensors:
        n = 1
        for d in s:
            n *= d
        params += n
    print(f"{args.model}: {params / 1e9:.3f}B parameters in {len(tensors)} tensors, {N} ranks (FSDP2 Shard(0))\n")

    # Norm blocks: what each rank sends through all_gather_object, pickled as sent.
    worst_blocks, worst_bytes, total_bytes = 0, 0, 0
    for r in range(N):
        blocks = []
        for t, (_, s) in enumerate(tensors):
            lo, hi = fsdp_range(s, r, N)
            blocks += [(t, start, level, 0x3F800000, 0x3F800000) for start, level in dyadic_blocks(lo, hi)]
        size = len(pickle.dumps((None, blocks)))
        worst_blocks, worst_bytes = max(worst_blocks, len(blocks)), max(worst_bytes, size)
        total_bytes += size
    # all_gather: every rank receives every other rank's list.
    norm_recv = total_bytes - worst_bytes

    hist_scope = sum(KEY_PASS_BUCKETS) * 8
    hist_per_tensor = len(tensors) * hist_scope
    ring = lambda b: 2 * b * (N - 1) / N  # bytes a rank sends in a ring all_reduce

    # What FSDP2 moves per step in bf16: parameters all-gathered for forward and
    # again for backward, gradients reduce-scattered (each rank sends (N-1)/N of it).
    fsdp = 3 * 2 * params * (N - 1) / N

    rows = [
        ("verdict (every method)", "1 all_reduce", 8, ring(8)),
        ("OnDARE rescale: norm blocks", "1 all_gather_object", worst_bytes, norm_recv),
        ("OnTIES per tensor: histograms", "3 all_reduce", hist_per_tensor, ring(hist_per_tensor)),
        ("OnTIES global: histograms", "3 all_reduce", hist_scope, ring(hist_scope)),
        ("OnTIES rescale: norm blocks", "1 all_gather_object", worst_bytes, norm_recv),
    ]
    print(f"{'exchange':<34}{'collectives':<22}{'payload/rank':>14}{'moved/rank':>14}{'vs FSDP':>10}")
    for label, coll, payload, moved in rows:
        print(f"{label:<34}{coll:<22}{payload / 2**20:>11.3f} MiB{moved / 2**20:>11.3f} MiB{moved / fsdp * 100:>9.4f}%")
    print(f"\nnorm blocks: at most {worst_blocks} per rank ({worst_blocks / len(tensors):.1f} per tensor)")
    print(f"OnTIES histogram: {hist_scope} bytes per scope and step (int64, {'+'.join(map(str, KEY_PASS_BUCKETS))} buckets)")
    print(f"FSDP2 itself: {fsdp / 2**30:.1f} GiB sent per rank per step (bf16: 2 all-gathers + 1 reduce-scatter)")
    worst = ring(hist_per_tensor) + 2 * norm_recv + ring(8) * 2
    print(f"worst case (OnTIES per tensor with rescale): {worst / 2**20:.1f} MiB per rank, {worst / fsdp * 100:.3f}% of FSDP's traffic, "
          f"{3 + 1 + 2} collectives")


if __name__ == "__main__":
    main()
