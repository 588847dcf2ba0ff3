"""An independent float64 transcription of transformers' LlamaForCausalLM and
Qwen2ForCausalLM forward passes (RMSNorm, rotate_half rotary embeddings with
the default, linear or llama3 frequencies,
repeat_kv grouped-query attention, SwiGLU, tied or untied head), in NumPy.

Usage: llama_forward.py DIR...; each DIR holds config.json, model.safetensors
(F32) and out.json ({"tokens": [...], "logits": [...]}, the Rust model's
logits). Exits non-zero if any logit differs from the reference by more than
1e-5 of the largest reference logit.
"""
import json, struct, sys, numpy as np
def load(d):
    cfg = json.load(open(f"{d}/config.json"))
    b = open(f"{d}/model.safetensors", "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); data = b[8 + n:]
    T = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        assert v["dtype"] == "F32"
        s, e = v["data_offsets"]
        T[k] = np.frombuffer(data[s:e], dtype="<f4").reshape(v["shape"]).astype(np.float64)
    return cfg, T
def lin(x, T, name):
    y = x @ T[name + ".weight"].T
    if name + ".bias" in T: y = y + T[name + ".bias"]
    return y
def rms(x, w, eps): return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))
def scaled(inv, cfg):
    """transformers' modeling_rope_utils: the `linear` and `llama3` rope types."""
    rs = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default": return inv
    if kind == "linear": return inv / rs["factor"]
    assert kind == "llama3", kind
    f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    out = np.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, (1 - smooth) * out / f + smooth * out, out)
def rope(x, theta, cfg):
    t, hh, d = x.shape
    inv = scaled(1.0 / (theta ** (np.arange(0, d, 2) / d)), cfg)
    f = np.outer(np.arange(t), inv); emb = np.concatenate([f, f], -1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin
def forward(cfg, T, toks):
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = T["model.embed_tokens.weight"][toks]; n = len(toks)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, T[p + "input_layernorm.weight"], eps)
        q = rope(lin(h, T, p + "self_attn.q_proj").reshape(n, H, D), theta, cfg)
        k = rope(lin(h, T, p + "self_attn.k_proj").reshape(n, KV, D), theta, cfg)
        v = lin(h, T, p + "self_attn.v_proj").reshape(n, KV, D)
        k = np.repeat(k, H // KV, axis=1); v = np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = s + np.triu(np.full((n, n), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True)); s = s / s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(n, H * D)
        x = x + lin(a, T, p + "self_attn.o_proj")
        h = rms(x, T[p + "post_attention_layernorm.weight"], eps)
        g = lin(h, T, p + "mlp.gate_proj"); u = lin(h, T, p + "mlp.up_proj")
        x = x + lin(g / (1 + np.exp(-g)) * u, T, p + "mlp.down_proj")
    x = rms(x, T["model.norm.weight"], eps)
    head = T["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else T["lm_head.weight"]
    return x @ head.T
for d in sys.argv[1:]:
    cfg, T = load(d)
    out = json.load(open(f"{d}/out.json"))
    ref = forward(cfg, T, np.array(out["tokens"]))
    got = np.array(out["logits"]).reshape(ref.shape)
    diff, scale = np.abs(got - ref).max(), np.abs(ref).max()
    biases = sorted({k.split(".")[-2] for k in T if k.endswith("bias")})
    rs = cfg.get("rope_scaling") or {}
    print(f"{d}: {cfg['architectures'][0]}, biases {biases}, rope {rs.get('rope_type', 'default')}: max |diff| {diff:.3e}, max |logit| {scale:.3e}")
    if not diff <= 1e-5 * scale:
        sys.exit(f"{d}: logits differ from the reference by {diff:.3e}")
