"""Recomputes every golden vector with the NumPy oracle and compares bits.

usage: python3 check_golden.py <golden dir>
Exit status 0 only when every case of every file is reproduced bit for bit.
The op table mirrors tests/golden-runner/src/ops.rs, but every op is computed by
oracle.py, which was written from SPEC.md alone.
"""

import json
import math
import os
import struct
import sys

import numpy as np

import oracle as o

F32 = np.float32

FORMAT = "online-merging-golden/1"


class Malformed(Exception):
    pass


class Rejected(Exception):
    """An input the spec says must be refused, carrying the fields the error reports."""

    def __init__(self, **fields):
        super().__init__(fields)
        self.fields = fields


def load_array(a, what):
    dtype = a.get("dtype")
    if dtype == "bool":
        return np.array([c == "1" for c in a["bits"]], dtype=bool)
    words = [int(h, 16) for h in a["hex"].split()]
    if dtype == "f32":
        return o.from_bits(np.array(words, dtype=np.uint32))
    if dtype == "u32":
        return np.array(words, dtype=np.uint32)
    if dtype in ("bf16", "f16"):
        return np.array(words, dtype=np.uint16)
    raise Malformed(f"{what}: unknown dtype {dtype!r}")


def array_strings(a):
    """The stored element strings of an array, for comparison with the file."""
    if a.dtype == bool:
        return ["1" if v else "0" for v in a]
    if a.dtype == np.float32:
        return [f"{v:08x}" for v in o.bits(a).tolist()]
    if a.dtype == np.uint32:
        return [f"{v:08x}" for v in a.tolist()]
    if a.dtype == np.uint16:
        return [f"{v:04x}" for v in a.tolist()]
    raise TypeError(a.dtype)


def expected_strings(a):
    return list(a["bits"]) if a["dtype"] == "bool" else a["hex"].split()


class Case:
    def __init__(self, c):
        self.raw = c
        self.name = c["name"]
        self.op = c["op"]
        self.tensor = c.get("tensor")
        self.seed = int(c["seed"], 16) if "seed" in c else None
        self.step = c.get("step")
        self.params = c.get("params", {})
        self.inputs = {k: load_array(v, f"{self.name}.{k}") for k, v in c.get("inputs", {}).items()}

    def f32(self, key):
        return o.from_bits(np.array([int(self.params[key]["f32"], 16)], dtype=np.uint32))[0]

    def f64(self, key):
        return struct.unpack("<d", int(self.params[key]["f64"], 16).to_bytes(8, "little"))[0]

    def word(self, key):
        return self.params[key]


def op_arith(c):
    a = o.flush(c.inputs["a"])
    fn = c.word("fn")
    if fn == "flush":
        return {"out": a}
    if fn == "sqrt":
        return {"out": o.sqrt(a)}
    b = o.flush(c.inputs["b"])
    return {"out": {"add": o.add, "sub": o.sub, "mul": o.mul, "div": o.div}[fn](a, b)}


def op_threefry(c):
    k = c.inputs["key"]
    x0, x1 = o.threefry2x32_20(k[0], k[1], c.inputs["c0"], c.inputs["c1"])
    return {"x0": x0, "x1": x1}


def valid_probability(p):
    """§2.4: a keep probability is a binary32 in (0, 1] (subnormals included)."""
    return not o.non_finite(p) and F32(0.0) < p <= F32(1.0)


def valid_fraction(p):
    """§4.1: a keep fraction is a normal binary32 in (0, 1]."""
    return valid_probability(p) and o.flush(p) != F32(0.0)


def op_mask(c):
    p = c.f32("p")
    n, offset, stream = c.params["n"], c.params["offset"], c.params["stream"]
    if not valid_probability(p):
        raise Rejected(kind="InvalidHyperparameter")
    if offset + n > 2**32:  # §2.3: element indices are below 2^32
        raise Rejected(kind="OutOfRange")
    t = o.fnv1a32(c.tensor)
    key = o.mask_key(c.seed, t, c.step)
    u = o.draws(c.seed, t, c.step, stream, offset, n)
    return {
        "tensor_id": np.array([t], dtype=np.uint32),
        "key": np.array(key, dtype=np.uint32),
        "u": u,
        "keep": o.keep_mask(c.seed, t, c.step, stream, p, n, start=offset),
    }


def op_tree_sum(c):
    x = c.inputs["x"]
    return {"sum": np.array([o.tree_sum(x)], dtype=F32), "l1": np.array([o.l1(x)], dtype=F32)}


def op_topk(c):
    p = c.f32("p")
    if not valid_fraction(p):
        raise Rejected(kind="InvalidHyperparameter")
    names = sorted(c.inputs, key=lambda s: s.encode("utf-8"))  # §4: bytewise name order
    x = np.concatenate([c.inputs[k] for k in names])
    t, cut, k = o.topk_threshold(x, p)
    keep = o.topk_mask(x, p)
    out = {"k": np.array([k], dtype=np.uint32), "T": np.array([t], dtype=np.uint32), "c": np.array([cut], dtype=np.uint32)}
    start = 0
    for name in names:
        n = c.inputs[name].size
        out[f"keep.{name}"] = keep[start:start + n]
        start += n
    return out


def hyper32(x):
    """§6: a binary64 hyperparameter rounded once to binary32, then F; non-finite refused."""
    y = F32(x)
    if not math.isfinite(x) or o.non_finite(y):
        raise Rejected(kind="InvalidHyperparameter")
    return o.flush(y)


def f64_list(c, key):
    return [struct.unpack("<d", int(v["f64"], 16).to_bytes(8, "little"))[0] for v in c.params[key]]


def load_all(c, keys):
    """Loads inputs as §7 says (converted, then F). The lowest non-finite index over
    all of them is refused (§1.4)."""
    xs, worst = [], None
    for k in keys:
        x = o.load(c.inputs[k], c.raw["inputs"][k]["dtype"])
        bad = o.first_non_finite(x)
        if bad is not None and (worst is None or bad < worst):
            worst = bad
        xs.append(x)
    if worst is not None:
        raise Rejected(kind="NonFinite", tensor=c.tensor, index=worst)
    return xs


def stored(c, x, dtype):
    out, err = o.store(x, dtype)
    if err:
        raise Rejected(kind=err[0], tensor=c.tensor, index=err[1])
    return out


def op_store(c):
    return {"stored": stored(c, c.inputs["x"], c.word("dtype"))}


def op_load(c):
    return {"x": o.load(c.inputs["h"], c.raw["inputs"]["h"]["dtype"])}


def left_fold(terms):
    acc = terms[0]
    for t in terms[1:]:
        acc = o.add(acc, t)
    return acc


def op_offline(c):
    models = []
    while f"model.{len(models)}" in c.inputs:
        models.append(f"model.{len(models)}")
    method = c.word("method")
    extra = {}
    if method == "linear":
        w = [hyper32(v) for v in f64_list(c, "weights")]
        x = load_all(c, models)
        wsum = left_fold(w)
        if c.params["normalize"] and wsum == 0:
            raise Rejected(kind="InvalidHyperparameter")
        out = left_fold([o.mul(wi, xi) for wi, xi in zip(w, x)])
        if c.params["normalize"]:
            out = o.div(out, wsum)
    elif method == "interpolate":
        w64 = c.f64("weight")
        if not 0.0 <= w64 <= 1.0:
            raise Rejected(kind="InvalidHyperparameter")
        w = hyper32(w64)
        sft, rlhf = load_all(c, models[:2])
        out = o.add(sft, o.mul(w, o.sub(rlhf, sft)))
    elif method == "slerp":
        t64 = c.f64("t")
        if not 0.0 <= t64 <= 1.0:
            raise Rejected(kind="InvalidHyperparameter")
        t = hyper32(t64)
        a, b = load_all(c, models[:2])
        na, nb = o.sqrt(o.tree_sum(o.mul(a, a))), o.sqrt(o.tree_sum(o.mul(b, b)))
        if o.non_finite(na) or o.non_finite(nb):
            raise Rejected(kind="NonFiniteReduction")
        nu_a = na if float(na) > 1e-8 else F32(1.0)
        nu_b = nb if float(nb) > 1e-8 else F32(1.0)
        dot = o.tree_sum(o.mul(o.div(a, nu_a), o.div(b, nu_b)))
        if o.non_finite(dot):
            raise Rejected(kind="NonFiniteReduction")
        if abs(float(dot)) > 0.9995:
            s0, s1, lerp = o.sub(F32(1.0), t), t, True
        else:
            th0 = o.fdlibm_acos(float(dot))
            sig = o.fdlibm_sin(th0)
            tht = th0 * float(t)
            s0 = o.flush(F32(o.fdlibm_sin(th0 - tht) / sig))
            s1 = o.flush(F32(o.fdlibm_sin(tht) / sig))
            lerp = False
        out = o.add(o.mul(s0, a), o.mul(s1, b))
        extra = {"s0": np.array([s0], F32), "s1": np.array([s1], F32), "lerp": np.array([lerp])}
    elif method == "gta":
        out = gta(c, models)
    else:
        raise Malformed(f"unknown method {method!r}")
    return {"merged": stored(c, out, c.word("out_dtype")), **extra}


def op_ties_global(c):
    """§6.2 TIES with global trimming over the listed tensors (in that order)."""
    names = c.params["tensors"]
    weights = [hyper32(v) for v in f64_list(c, "weights")]
    densities = f64_list(c, "densities")
    lam = hyper32(c.f64("lambda"))
    bases, taus = [], []
    for j, _ in enumerate(names):
        base, *xs = [o.load(c.inputs[k], c.raw["inputs"][k]["dtype"]) for k in
                     [f"t{j}/base"] + [f"t{j}/model.{i}" for i in range(len(weights))]]
        bases.append(base)
        taus.append([o.sub(x, base) for x in xs])
    masks = [global_masks([taus[j][i] for j in range(len(names))], F32(densities[i])) for i in range(len(weights))]
    out = {}
    for j, _ in enumerate(names):
        ys = [o.mul(weights[i], np.where(masks[i][j], taus[j][i], F32(0.0)).astype(F32)) for i in range(len(weights))]
        out[f"t{j}/merged"] = o.add(bases[j], o.mul(lam, consensus_mix(ys, weights, normalize=True)))
    return out


def consensus_mix(ys, weights, normalize):
    """§6.2 step 3-4 with consensus: sign election, disjoint sum, optional mean."""
    total = left_fold(ys)
    positive = total >= 0
    agree = [(y != 0) & ((y > 0) == positive) for y in ys]
    mixed = left_fold([np.where(a, y, F32(0.0)) for a, y in zip(agree, ys)])
    if not normalize:
        return mixed
    div = left_fold([np.where(a, w, F32(0.0)).astype(F32) for a, w in zip(agree, weights)])
    return o.div(mixed, np.where(div == 0, F32(1.0), div).astype(F32))


def gta(c, models):
    """§6.2: generalized task arithmetic (task arithmetic, TIES, DARE linear, DARE-TIES)."""
    sparsify = c.word("sparsify")
    lam = hyper32(c.f64("lambda"))
    weights = [hyper32(v) for v in f64_list(c, "weights")]
    densities = f64_list(c, "densities")
    if sparsify != "none":
        for d in densities:
            if not valid_fraction(F32(d)) or not 0.0 < d <= 1.0:
                raise Rejected(kind="InvalidHyperparameter")
    base, *xs = load_all(c, ["base"] + models)
    taus = [o.sub(x, base) for x in xs]
    n = base.size
    ys = []
    for i, tau in enumerate(taus):
        if sparsify == "magnitude":
            kept = np.where(o.topk_mask(tau, F32(densities[i])), tau, F32(0.0))
        elif sparsify == "random":
            p = F32(densities[i])
            sigma = o.flush(F32(1.0 / float(p)))
            keep = o.keep_mask(c.seed, o.fnv1a32(c.tensor), 0, 2 + i, p, n)
            kept = np.where(keep, o.mul(tau, sigma), F32(0.0))
        else:
            kept = tau
        ys.append(o.mul(weights[i], kept))
    if c.params["consensus"]:
        mixed = consensus_mix(ys, weights, c.params["normalize"])
    else:
        mixed = left_fold(ys)
        d = left_fold(weights)
        if c.params["normalize"]:
            mixed = o.div(mixed, F32(1.0) if abs(float(d)) < 1e-8 else d)
    return o.add(base, o.mul(lam, mixed))


# ----------------------------------------------------------------- §5 optimizers

def rn(x):
    """F(RN(x)): a binary64 scalar handed to the element arithmetic (§1.6)."""
    return o.flush(F32(x))


def lr_at(c, k):
    """§1.6: the learning rate of step k in binary64."""
    lr = c.f64("lr")
    if c.word("schedule") == "constant":
        return lr
    warmup, total = c.params["warmup"], c.params["total"]
    s = k - 1
    if s < warmup:
        return lr * (s / warmup)
    q = min(1.0, (s - warmup) / max(1, total - warmup))
    return lr * (0.5 * (1.0 + o.fdlibm_cos(o.PI * q)))


def validate_hyper(c):
    """§1.6's validation; only the error kind is compared (the names are merge-core's)."""
    lr, b1, b2, eps, wd = (c.f64(k) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    ok = math.isfinite(lr) and lr >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1
    ok = ok and eps > 0 and o.flush(F32(eps)) != 0 and not o.non_finite(F32(eps))
    ok = ok and math.isfinite(wd) and wd >= 0 and c.params["k"] >= 1
    if c.word("schedule") != "constant":
        ok = ok and c.params["total"] >= 1 and c.params["warmup"] <= c.params["total"]
    merge = c.word("merge")
    if merge != "none":
        p, alpha = c.f64("p"), c.f64("alpha")
        ok = ok and 0 < p <= 1 and F32(p) > 0 and 0 <= alpha <= 1
        if merge == "ties":
            ok = ok and o.flush(F32(p)) != 0
        else:
            clip = c.f64("clip")
            ok = ok and clip > 0 and o.flush(F32(clip)) != 0 and not o.non_finite(F32(clip))
            if c.word("variant") == "reference":
                ok = ok and not o.non_finite(F32(1.0 / float(F32(p))))
    if not ok:
        raise Rejected(kind="InvalidHyperparameter")


def step_scalars(c, k):
    """§5.1's table for step k."""
    eta = lr_at(c, k)
    beta1, beta2, wd = c.f64("beta1"), c.f64("beta2"), c.f64("weight_decay")
    b1 = 1.0 - o.pow_f64(beta1, k)
    b2 = 1.0 - o.pow_f64(beta2, k)
    sc = {
        "lr": rn(eta),
        "beta1": rn(beta1),
        "beta2": rn(beta2),
        "one_minus_beta1": rn(1.0 - beta1),
        "one_minus_beta2": rn(1.0 - beta2),
        "eps": rn(c.f64("eps")),
    }
    if c.word("form") == "hf":
        sc["neg_step_size"] = rn(-((eta * math.sqrt(b2)) / b1))
        sc["decay_after"] = rn(eta * wd)
    else:
        sc["neg_step_size"] = rn(-(eta / b1))
        sc["bc2_sqrt"] = rn(math.sqrt(b2))
        sc["decay_before"] = rn(1.0 - eta * wd)
    return sc


def first_failure(checks):
    """§5.6: the lowest index at which any of `checks` (label, array) is non-finite,
    and the first label failing there; None when all are finite."""
    best = None
    for label, arr in checks:
        j = o.first_non_finite(arr)
        if j is not None and (best is None or j < best[0]):
            best = (j, label)
    return best


def clamp(x, cl):
    x = np.asarray(x, F32)
    return np.minimum(np.maximum(x, -cl), cl).astype(F32)


def topp(x, mask):
    """§5.3 TopP: F(x_i) where the threshold keeps i, else +0."""
    return np.where(mask, o.flush(x), F32(0.0)).astype(F32)


def ties_rho(full, kept):
    """§5.3: ρ = ‖x‖₁ ⊘ ‖x'‖₁ when ‖x‖₁ ≥ RN32(1e-8) and ‖x'‖₁ > 0, else None."""
    n_full, n_kept = o.l1(full), o.l1(kept)
    if n_full >= F32(1e-8) and n_kept > 0:
        return o.div(n_full, n_kept)
    return None


def scope_masks(xs, p):
    """The §4 keep masks of each tensor: per tensor, or over the concatenation (global)."""
    return [o.topk_mask(x, p) for x in xs]


def global_masks(xs, p):
    mask = o.topk_mask(np.concatenate(xs), p)
    out, start = [], 0
    for x in xs:
        out.append(mask[start:start + x.size])
        start += x.size
    return out


def ties_trim(xs, p, global_scope, rescale):
    """§5.3 TopP of each tensor (threshold per tensor or over all of them), then
    the optional ρ rescale, over the same scope; used for τ' and for the update."""
    masks = (global_masks if global_scope else scope_masks)(xs, p)
    kept = [topp(x, m) for x, m in zip(xs, masks)]
    if rescale:
        if global_scope:
            rhos = [ties_rho(np.concatenate(xs), np.concatenate(kept))] * len(kept)
        else:
            rhos = [ties_rho(x, kt) for x, kt in zip(xs, kept)]
        kept = [kt if r is None else o.mul(kt, r) for kt, r in zip(kept, rhos)]
    return kept


def ties_combine(variant, tau, d, alpha, omega):
    """§5.3 combine."""
    tb, db = o.bits(tau), o.bits(d)
    if variant == "reference":
        s_pos = o.add(tau, d) >= 0
        t_neg, d_neg = (tb >> 31) == 1, (db >> 31) == 1
        a = np.where((tau != 0) & (t_neg != s_pos), o.mul(alpha, tau), F32(0.0)).astype(F32)
        b = np.where((d != 0) & (d_neg != s_pos), o.mul(omega, d), F32(0.0)).astype(F32)
        return o.add(a, b)
    a, b = o.mul(alpha, tau), o.mul(omega, d)
    ka, kb = o.magnitude_key(a), o.magnitude_key(b)
    opposite = (a != 0) & (b != 0) & ((o.bits(a) >> 31) != (o.bits(b) >> 31))
    larger = np.where(ka > kb, a, np.where(kb > ka, b, np.where(a > 0, a, b))).astype(F32)
    return np.where(opposite, larger, o.add(a, b)).astype(F32)


def op_optimizer(c):
    validate_hyper(c)
    if "tensors" in c.params:
        tensors = [(name, f"t{j}/") for j, name in enumerate(c.params["tensors"])]
    else:
        tensors = [(c.tensor, "")]
    merge, form, K = c.word("merge"), c.word("form"), c.params["k"]
    variant = c.word("variant") if merge != "none" else None
    tau_dtype = c.word("tau_dtype")
    seed = c.seed

    def reject(name, j, what=None):
        fields = {"kind": "NonFinite", "tensor": name, "index": j}
        if what:
            fields["what"] = what
        raise Rejected(**fields)

    st = []
    for name, pre in tensors:
        t = {"name": name, "pre": pre, "id": o.fnv1a32(name)}
        for k in ("theta", "m", "v"):
            t[k] = c.inputs[pre + k]
        t["grads"] = []
        while f"{pre}grad.{len(t['grads']) + 1}" in c.inputs:
            t["grads"].append(c.inputs[f"{pre}grad.{len(t['grads']) + 1}"])
        t["cached"] = np.zeros(t["theta"].size, F32) if K > 1 else None
        st.append(t)

    out = {}
    if merge != "none":
        p32 = F32(c.f64("p"))
        taus = []
        for t in st:
            base, sft = (o.load(c.inputs[t["pre"] + k], c.raw["inputs"][t["pre"] + k]["dtype"]) for k in ("base", "sft"))
            bad = first_failure([("base weights", base), ("SFT weights", sft)])
            if bad:
                reject(t["name"], bad[0])
            tau = o.sub(sft, base)
            bad = first_failure([("task vector", tau)])
            if bad:
                reject(t["name"], bad[0])
            taus.append(tau)
        if merge == "dare":
            c32 = rn(c.f64("clip"))
            for t, tau in zip(st, taus):
                if variant == "reference":
                    s_ = rn(1.0 / float(p32))
                    keep = o.keep_mask(seed, t["id"], 0, 0, p32, tau.size)
                    t["tau_f32"] = np.where(keep, clamp(o.mul(tau, s_), c32), F32(0.0)).astype(F32)
                else:
                    t["tau_f32"] = tau
        else:
            kept = ties_trim(taus, p32, c.word("scope") == "global", c.params["rescale"])
            for t, kt in zip(st, kept):
                t["tau_f32"] = kt
        for t in st:
            stored_tau, err = o.store(t["tau_f32"], tau_dtype)
            if err:
                raise Rejected(kind=err[0], tensor=t["name"], index=err[1])
            t["tau_stored"] = stored_tau
            t["tau"] = o.load(stored_tau, tau_dtype)
            out[t["pre"] + "tau"] = stored_tau

    steps = max(len(t["grads"]) for t in st)
    scal = {}
    alpha32 = rn(c.f64("alpha")) if merge != "none" else None
    omega = rn(1.0 - c.f64("alpha")) if merge != "none" else None
    for k in range(1, steps + 1):
        sc = step_scalars(c, k)
        for key, val in sc.items():
            scal.setdefault(key, []).append(val)
        merge_step = k % K == 0
        # Pass 1: the update of every tensor (needed first by a global OnTIES threshold).
        work = []
        for t in st:
            g, th, m, v = (o.flush(x) for x in (t["grads"][k - 1], t["theta"], t["m"], t["v"]))
            cached = o.flush(t["cached"]) if t["cached"] is not None else None
            checks = [("gradient", g), ("parameter", th), ("exp_avg", m), ("exp_avg_sq", v)]
            if cached is not None:
                checks.append(("cached delta", cached))
            if merge != "none" and merge_step:
                checks.append(("task vector", t["tau"]))
            if form == "torch" and c.f64("weight_decay") != 0:
                th = o.mul(th, sc["decay_before"])
            m2 = o.add(o.mul(sc["beta1"], m), o.mul(sc["one_minus_beta1"], g))
            v2 = o.add(o.mul(sc["beta2"], v), o.mul(sc["one_minus_beta2"], o.mul(g, g)))
            sq = o.sqrt(v2)
            denom = o.add(sq, sc["eps"]) if form == "hf" else o.add(o.div(sq, sc["bc2_sqrt"]), sc["eps"])
            delta = o.mul(sc["neg_step_size"], o.div(m2, denom))
            checks += [("updated exp_avg", m2), ("updated exp_avg_sq", v2)]
            work.append(dict(t=t, th=th, m2=m2, v2=v2, delta=delta, cached=cached, checks=checks))
        if merge == "ties" and merge_step:
            ds = [w["delta"] if w["cached"] is None else o.add(w["delta"], w["cached"]) for w in work]
            kept = ties_trim(ds, p32, c.word("scope") == "global", c.params["rescale"])
            for w, kt in zip(work, kept):
                w["ties_d"] = kt
        for w in work:
            t, th, delta, cached = w["t"], w["th"], w["delta"], w["cached"]
            checks = w["checks"]
            new_cached = cached
            if not merge_step:
                checks.append(("update", delta))
                th = o.add(th, delta)
                new_cached = o.add(cached, delta)
                checks.append(("updated cached delta", new_cached))
            else:
                if cached is not None:
                    th = o.sub(th, cached)
                    d = o.add(delta, cached)
                    new_cached = np.zeros_like(cached)
                else:
                    d = delta
                checks.append(("update", d))
                if merge == "none":
                    th = o.add(th, d)
                elif merge == "dare":
                    keep = o.keep_mask(seed, t["id"], k, 0, p32, d.size)
                    s_ = rn(1.0 / float(p32)) if variant == "reference" else None
                    dp = np.where(keep, o.mul(d, s_) if s_ is not None else d, F32(0.0)).astype(F32)
                    if c.params["rescale"]:
                        n_full, n_kept = o.l1(d), o.l1(dp)
                        if o.non_finite(n_full) or o.non_finite(n_kept):
                            raise Rejected(kind="NonFiniteReduction", tensor=t["name"])
                        if n_full >= F32(1e-8):
                            r = o.div(n_full, o.add(n_kept, sc["eps"]))
                            dp = clamp(o.mul(dp, r), rn(c.f64("clip")))
                    checks.append(("sparsified update", dp))
                    if variant == "reference":
                        th = o.add(o.add(th, o.mul(alpha32, t["tau"])), o.mul(omega, dp))
                    else:
                        tkeep = o.keep_mask(seed, t["id"], k, 1, p32, d.size)
                        tt = np.where(tkeep, t["tau"], F32(0.0)).astype(F32)
                        th = o.add(th, o.add(o.mul(alpha32, tt), o.mul(omega, dp)))
                else:
                    checks.append(("sparsified update", w["ties_d"]))
                    th = o.add(th, ties_combine(variant, t["tau"], w["ties_d"], alpha32, omega))
                if cached is not None:
                    checks.append(("updated cached delta", new_cached))
            if form == "hf" and c.f64("weight_decay") != 0:
                th = o.sub(th, o.mul(sc["decay_after"], th))
            checks.append(("updated parameter", th))
            bad = first_failure(checks)
            if bad:
                reject(t["name"], bad[0], bad[1])
            w["new"] = (th, w["m2"], w["v2"], new_cached)
        for w in work:
            t = w["t"]
            t["theta"], t["m"], t["v"], t["cached"] = w["new"]
    for t in st:
        pre = t["pre"]
        out[pre + "theta"], out[pre + "m"], out[pre + "v"] = t["theta"], t["m"], t["v"]
        if t["cached"] is not None:
            out[pre + "cached"] = t["cached"]
    for key, vals in scal.items():
        out["scalar." + key] = np.array(vals, F32)
    return out


def op_ties_combine(c):
    tau, d = o.flush(c.inputs["tau"]), o.flush(c.inputs["d"])
    return {"u": ties_combine(c.word("variant"), tau, d, c.f32("alpha"), c.f32("omega"))}


OPS = {
    "optimizer": op_optimizer,
    "ties_combine": op_ties_combine,
    "ties_global": op_ties_global,
    "store": op_store,
    "load": op_load,
    "offline": op_offline,
    "arith": op_arith,
    "threefry": op_threefry,
    "mask": op_mask,
    "tree_sum": op_tree_sum,
    "topk": op_topk,
}


def compare(case, expected, got):
    """A list of difference descriptions (empty when bit-identical)."""
    diffs = []
    if "error" in expected:
        if not isinstance(got, Rejected):
            return [f"expected error {expected['error']['message']!r}, oracle computed outputs"]
        for k, v in got.fields.items():
            if expected["error"].get(k) != v:
                diffs.append(f"error field {k}: expected {expected['error'].get(k)!r}, oracle {v!r}")
        return diffs
    if isinstance(got, Rejected):
        return [f"expected outputs, oracle rejected the input: {got.fields}"]
    want = expected["outputs"]
    for k in want:
        if k not in got:
            diffs.append(f"output {k!r} not computed by the oracle")
            continue
        w = expected_strings(want[k])
        g = array_strings(np.asarray(got[k]).ravel())
        if len(w) != len(g):
            diffs.append(f"output {k!r}: expected {len(w)} elements, oracle {len(g)}")
            continue
        bad = [i for i in range(len(w)) if w[i] != g[i]]
        if bad:
            i = bad[0]
            diffs.append(f"output {k!r}: {len(bad)} of {len(w)} differ; first at index {i}: expected {w[i]}, oracle {g[i]}")
    for k in got:
        if k not in want:
            diffs.append(f"output {k!r} computed by the oracle but not in the golden file")
    return diffs


def check_file(path):
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise Malformed(f"{path}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    failures = []
    for raw in doc["cases"]:
        c = Case(raw)
        if c.op not in OPS:
            failures.append(f"{os.path.basename(path)}: case {c.name!r}: the oracle has no op {c.op!r}")
            continue
        try:
            got = OPS[c.op](c)
        except Rejected as r:
            got = r
        for d in compare(c, raw["expected"], got):
            failures.append(f"{os.path.basename(path)}: case {c.name!r} (op {c.op}): {d}")
    return len(doc["cases"]), failures


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    o.self_test()
    files = sorted(f for f in os.listdir(argv[1]) if f.endswith(".json"))
    if not files:
        print(f"no golden files in {argv[1]}", file=sys.stderr)
        return 2
    all_failures = []
    for f in files:
        try:
            n, failures = check_file(os.path.join(argv[1], f))
        except Malformed as e:
            print(f"MALFORMED {e}")
            return 2
        print(f"{'ok  ' if not failures else 'FAIL'} {f}: {n} cases" + (f", {len(failures)} differ" if failures else ""))
        all_failures += failures
    for line in all_failures:
        print(line)
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
