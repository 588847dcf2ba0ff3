/* Reproduces golden vectors of tests/golden/ bit for bit through merge-core's
 * C ABI: the optimizer runs of optimizer.json and the merges of offline.json.
 *
 * It reads their plain-text form (capi/tests/golden/optimizer.txt, offline.txt;
 * capi/tests/golden_text.rs writes it from the JSON, fails when the committed
 * text is stale, and describes the format), runs every case, compares every expected word and error, prints
 * each difference and a summary, and exits 1 when anything differs or an
 * expected error does not come back with its code and message (2 for a file it
 * cannot read). C99, libc only.
 *
 *   cargo build -p merge-core-capi
 *   cc -std=c99 -Icapi/include capi/examples/golden.c target/debug/libmerge_core_c.a \
 *      -lm -lpthread -ldl -o golden
 *   ./golden capi/tests/golden/optimizer.txt capi/tests/golden/offline.txt
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "merge_core.h"

#define MAX_TENSORS 16
#define MAX_STEPS 16
#define MAX_MODELS 16
#define MAX_OUTPUTS 64

/* Beside the MC_DTYPE_* codes: flags, which only expectations hold. */
#define DTYPE_BOOL 100

typedef struct {
    uint32_t dtype;
    size_t n;
    void *data; /* uint32_t words (f32), uint16_t (bf16, f16) or uint8_t (bool) */
} Array;

/* ---- per-case memory: everything a case allocates is dropped at its end ---- */

static uint64_t arena[2u << 20]; /* 16 MiB, 8-byte aligned */
static size_t arena_used;        /* in uint64_t words */

static void *alloc_zeroed(size_t bytes) {
    size_t words = (bytes + 7) / 8;
    if (words > sizeof arena / sizeof arena[0] - arena_used) {
        fprintf(stderr, "golden: a case needs more than %zu bytes\n", sizeof arena);
        exit(2);
    }
    void *p = &arena[arena_used];
    memset(p, 0, words * 8);
    arena_used += words;
    return p;
}

static size_t dtype_size(uint32_t dtype) {
    return dtype == MC_DTYPE_F32 ? 4 : dtype == DTYPE_BOOL ? 1 : 2;
}

static Array new_array(uint32_t dtype, size_t n) {
    Array a = {dtype, n, alloc_zeroed(n * dtype_size(dtype))};
    return a;
}

static uint32_t word_at(const Array *a, size_t i) {
    switch (a->dtype) {
    case MC_DTYPE_F32: return ((const uint32_t *)a->data)[i];
    case DTYPE_BOOL: return ((const uint8_t *)a->data)[i];
    default: return ((const uint16_t *)a->data)[i];
    }
}

static McSrc src(const Array *a) {
    McSrc s = {a->dtype, a->data};
    return s;
}

static McDst dst(Array *a) {
    McDst d = {a->dtype, a->data};
    return d;
}

/* ---- reading the text ---- */

static FILE *in;
static const char *in_path;
static const char *case_name = "(header)";

static void malformed(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "golden: %s, case %s: malformed: ", in_path, case_name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* The next token into w[64]; false at the end of the file. */
static bool next_word(char w[64]) {
    return fscanf(in, " %63s", w) == 1;
}

static void expect(const char *key) {
    char w[64];
    if (!next_word(w) || strcmp(w, key) != 0) malformed("expected \"%s\"", key);
}

static uint64_t read_uint(void) {
    uint64_t x;
    if (fscanf(in, "%" SCNu64, &x) != 1) malformed("expected an unsigned integer");
    return x;
}

static uint64_t read_hex(void) {
    uint64_t x;
    if (fscanf(in, "%" SCNx64, &x) != 1) malformed("expected hex digits");
    return x;
}

static double read_f64(void) {
    uint64_t bits = read_hex();
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static uint64_t key_uint(const char *key) {
    expect(key);
    return read_uint();
}

static double key_f64(const char *key) {
    expect(key);
    return read_f64();
}

static bool key_flag(const char *key) {
    uint64_t x = key_uint(key);
    if (x > 1) malformed("%s is %" PRIu64 ", expected 0 or 1", key, x);
    return x == 1;
}

/* `<length>:<bytes>`, NUL-terminated in the arena. */
static char *read_string(size_t *len) {
    size_t n;
    if (fscanf(in, " %zu:", &n) != 1) malformed("expected <length>:<bytes>");
    char *s = alloc_zeroed(n + 1);
    if (fread(s, 1, n, in) != n) malformed("a string ends early");
    *len = n;
    return s;
}

static Array read_array(void) {
    char dtype[64];
    if (!next_word(dtype)) malformed("expected an array");
    uint32_t code = strcmp(dtype, "f32") == 0    ? MC_DTYPE_F32
                    : strcmp(dtype, "bf16") == 0 ? MC_DTYPE_BF16
                    : strcmp(dtype, "f16") == 0  ? MC_DTYPE_F16
                    : strcmp(dtype, "bool") == 0 ? DTYPE_BOOL
                                                 : UINT32_MAX;
    if (code == UINT32_MAX) malformed("unknown dtype %s", dtype);
    Array a = new_array(code, (size_t)read_uint());
    for (size_t i = 0; i < a.n; i++) {
        uint64_t w = code == DTYPE_BOOL ? read_uint() : read_hex();
        if (w >> (8 * dtype_size(code)) != 0 || (code == DTYPE_BOOL && w > 1)) malformed("%s word %zu out of range", dtype, i);
        switch (code) {
        case MC_DTYPE_F32: ((uint32_t *)a.data)[i] = (uint32_t)w; break;
        case DTYPE_BOOL: ((uint8_t *)a.data)[i] = (uint8_t)w; break;
        default: ((uint16_t *)a.data)[i] = (uint16_t)w; break;
        }
    }
    return a;
}

static Array key_array(const char *key) {
    expect(key);
    return read_array();
}

static size_t key_count(const char *key, size_t max) {
    uint64_t n = key_uint(key);
    if (n > max) malformed("%s = %" PRIu64 " exceeds %zu", key, n, max);
    return (size_t)n;
}

/* ---- what a case computed ---- */

typedef struct {
    char label[96];
    Array a;
} Output;

static Output outputs[MAX_OUTPUTS];
static size_t output_count;

static void put(const char *prefix, const char *name, Array a) {
    if (output_count == MAX_OUTPUTS) malformed("more than %d outputs", MAX_OUTPUTS);
    Output *o = &outputs[output_count++];
    snprintf(o->label, sizeof o->label, "%s%s", prefix, name);
    o->a = a;
}

static Array one_f32(float x) {
    Array a = new_array(MC_DTYPE_F32, 1);
    memcpy(a.data, &x, sizeof x);
    return a;
}

/* A tensor of a case: its name and the prefix of its output labels. */
typedef struct {
    char *name;
    size_t name_len;
    char *prefix;
} Tensor;

static Tensor read_tensor(void) {
    Tensor t;
    size_t prefix_len;
    expect("tensor");
    t.name = read_string(&t.name_len);
    t.prefix = read_string(&prefix_len);
    return t;
}

/* ---- the ops ---- */

typedef struct {
    Tensor t;
    Array base, sft, theta, m, v, tau;
    Array grads[MAX_STEPS];
    float *cached;  /* step-K only */
    float *scratch; /* OnTIES only */
} OptimizerTensor;

/* Task vectors once, then steps 1..S: each step's scalars, then every tensor. */
static int run_optimizer(char *msg, size_t cap) {
    McOnlineConfig c = mc_online_config_default();
    c.adam.form = (uint32_t)key_uint("form");
    c.adam.lr = key_f64("lr");
    c.adam.beta1 = key_f64("beta1");
    c.adam.beta2 = key_f64("beta2");
    c.adam.eps = key_f64("eps");
    c.adam.weight_decay = key_f64("weight_decay");
    c.adam.schedule = (uint32_t)key_uint("schedule");
    c.adam.warmup = key_uint("warmup");
    c.adam.total = key_uint("total");
    c.merge.method = (uint32_t)key_uint("method");
    c.merge.variant = (uint32_t)key_uint("variant");
    c.merge.p = key_f64("p");
    c.merge.alpha = key_f64("alpha");
    c.merge.rescale = key_flag("rescale");
    c.merge.clip = key_f64("clip");
    c.merge.scope = (uint32_t)key_uint("scope");
    c.k = (uint32_t)key_uint("k");
    expect("seed");
    c.seed = read_hex();
    uint32_t tau_dtype = (uint32_t)key_uint("tau_dtype");
    size_t count = key_count("tensors", MAX_TENSORS), steps = key_count("steps", MAX_STEPS);

    static OptimizerTensor ts[MAX_TENSORS];
    McTaskVectorJob init[MAX_TENSORS];
    McStepJob jobs[MAX_TENSORS];
    for (size_t j = 0; j < count; j++) {
        OptimizerTensor *t = &ts[j];
        t->t = read_tensor();
        t->base = key_array("base");
        t->sft = key_array("sft");
        t->theta = key_array("theta");
        t->m = key_array("m");
        t->v = key_array("v");
        for (size_t s = 0; s < steps; s++) t->grads[s] = key_array("grad");
        size_t n = t->theta.n;
        t->tau = new_array(tau_dtype, n);
        t->cached = c.k > 1 ? alloc_zeroed(n * sizeof(float)) : NULL;
        t->scratch = c.merge.method == MC_MERGE_TIES ? alloc_zeroed(n * sizeof(float)) : NULL;
        McTaskVectorJob i = {t->t.name, t->t.name_len, n, src(&t->base), src(&t->sft), dst(&t->tau), t->scratch};
        init[j] = i;
        McStepJob s = {t->t.name, t->t.name_len, n, NULL, t->theta.data, t->m.data, t->v.data, t->cached, src(&t->tau), t->scratch};
        jobs[j] = s;
    }

    /* One tensor goes through the single-tensor entry points, several through the job arrays. */
    int rc = MC_OK;
    if (c.merge.method != MC_MERGE_NONE) {
        if (count == 1) {
            const McTaskVectorJob *i = &init[0];
            rc = mc_init_task_vector(&c, i->name, i->name_len, i->base, i->sft, i->out, i->scratch, i->n, msg, cap);
        } else {
            rc = mc_init_task_vectors(&c, init, count, msg, cap);
        }
    }
    static const char *const scalar_names[] = {"lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "neg_step_size", "bc2_sqrt", "decay_before", "decay_after"};
    enum { SCALARS = sizeof scalar_names / sizeof scalar_names[0] };
    Array scalars[SCALARS];
    for (size_t i = 0; i < SCALARS; i++) scalars[i] = new_array(MC_DTYPE_F32, steps);
    for (uint64_t k = 1; k <= steps && rc == MC_OK; k++) {
        McStepScalars s;
        rc = mc_step_scalars(&c, k, &s, msg, cap);
        if (rc != MC_OK) break;
        const float values[SCALARS] = {s.lr, s.beta1, s.beta2, s.one_minus_beta1, s.one_minus_beta2, s.eps, s.neg_step_size, s.bc2_sqrt, s.decay_before, s.decay_after};
        for (size_t i = 0; i < SCALARS; i++) memcpy((uint32_t *)scalars[i].data + (k - 1), &values[i], sizeof(float));
        for (size_t j = 0; j < count; j++) jobs[j].grad = ts[j].grads[k - 1].data;
        if (count == 1) {
            const McStepJob *t = &jobs[0];
            rc = mc_step_tensor(&c, k, t->name, t->name_len, t->grad, t->theta, t->m, t->v, t->cached, t->tau, t->scratch, t->n, msg, cap);
        } else {
            rc = mc_step_tensors(&c, k, jobs, count, msg, cap);
        }
    }
    if (rc != MC_OK) return rc;
    for (size_t j = 0; j < count; j++) {
        OptimizerTensor *t = &ts[j];
        put(t->t.prefix, "theta", t->theta);
        put(t->t.prefix, "m", t->m);
        put(t->t.prefix, "v", t->v);
        if (t->cached) {
            Array cached = {MC_DTYPE_F32, t->theta.n, t->cached};
            put(t->t.prefix, "cached", cached);
        }
        if (c.merge.method != MC_MERGE_NONE) put(t->t.prefix, "tau", t->tau);
    }
    for (size_t i = 0; i < SCALARS; i++) put("scalar.", scalar_names[i], scalars[i]);
    return MC_OK;
}

static int run_linear(char *msg, size_t cap) {
    size_t count = key_count("models", MAX_MODELS);
    bool normalize = key_flag("normalize");
    double weights[MAX_MODELS];
    expect("weights");
    for (size_t i = 0; i < count; i++) weights[i] = read_f64();
    uint32_t out_dtype = (uint32_t)key_uint("out_dtype");
    Tensor t = read_tensor();
    Array models[MAX_MODELS];
    McSrc srcs[MAX_MODELS];
    for (size_t i = 0; i < count; i++) {
        models[i] = key_array("model");
        srcs[i] = src(&models[i]);
    }
    size_t n = count > 0 ? models[0].n : 0;
    Array out = new_array(out_dtype, n);
    int rc = mc_merge_linear(t.name, t.name_len, srcs, weights, count, normalize, dst(&out), n, msg, cap);
    if (rc == MC_OK) put(t.prefix, "merged", out);
    return rc;
}

static int run_interpolate(char *msg, size_t cap) {
    double weight = key_f64("weight");
    uint32_t out_dtype = (uint32_t)key_uint("out_dtype");
    Tensor t = read_tensor();
    Array sft = key_array("sft"), rlhf = key_array("rlhf");
    Array out = new_array(out_dtype, sft.n);
    int rc = mc_merge_interpolate(t.name, t.name_len, src(&sft), src(&rlhf), weight, dst(&out), sft.n, msg, cap);
    if (rc == MC_OK) put(t.prefix, "merged", out);
    return rc;
}

static int run_slerp(char *msg, size_t cap) {
    double factor = key_f64("t");
    uint32_t out_dtype = (uint32_t)key_uint("out_dtype");
    Tensor t = read_tensor();
    Array a = key_array("a"), b = key_array("b");
    Array out = new_array(out_dtype, a.n);
    McSlerpScalars s;
    int rc = mc_merge_slerp(t.name, t.name_len, src(&a), src(&b), factor, dst(&out), a.n, &s, msg, cap);
    if (rc != MC_OK) return rc;
    put(t.prefix, "merged", out);
    put(t.prefix, "s0", one_f32(s.s0));
    put(t.prefix, "s1", one_f32(s.s1));
    Array lerp = new_array(DTYPE_BOOL, 1);
    *(uint8_t *)lerp.data = s.lerp;
    put(t.prefix, "lerp", lerp);
    return MC_OK;
}

static int run_gta(char *msg, size_t cap) {
    McGtaConfig c;
    c.sparsify = (uint32_t)key_uint("sparsify");
    c.consensus = key_flag("consensus");
    c.normalize = key_flag("normalize");
    c.lambda = key_f64("lambda");
    expect("seed");
    uint64_t seed = read_hex();
    uint32_t scope = (uint32_t)key_uint("scope");
    uint32_t out_dtype = (uint32_t)key_uint("out_dtype");
    size_t models = key_count("models", MAX_MODELS);
    McModelParams params[MAX_MODELS];
    expect("weights");
    for (size_t i = 0; i < models; i++) params[i].weight = read_f64();
    expect("densities");
    for (size_t i = 0; i < models; i++) params[i].density = read_f64();
    size_t count = key_count("tensors", MAX_TENSORS);

    static McSrc srcs[MAX_TENSORS][MAX_MODELS];
    Tensor names[MAX_TENSORS];
    Array outs[MAX_TENSORS];
    McGtaTensor tensors[MAX_TENSORS];
    for (size_t j = 0; j < count; j++) {
        names[j] = read_tensor();
        Array base = key_array("base");
        for (size_t i = 0; i < models; i++) {
            Array m = key_array("model");
            srcs[j][i] = src(&m);
        }
        outs[j] = new_array(out_dtype, base.n);
        McGtaTensor t = {names[j].name, names[j].name_len, base.n, src(&base), srcs[j], dst(&outs[j])};
        tensors[j] = t;
    }
    int rc = mc_merge_gta(&c, seed, params, models, scope, tensors, count, msg, cap);
    if (rc == MC_OK)
        for (size_t j = 0; j < count; j++) put(names[j].prefix, "merged", outs[j]);
    return rc;
}

/* ---- comparing with the expectation ---- */

static const Output *find(const char *label) {
    for (size_t i = 0; i < output_count; i++)
        if (strcmp(outputs[i].label, label) == 0) return &outputs[i];
    return NULL;
}

static bool failed_case;

static void report(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL %s, case %s: ", in_path, case_name);
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
    failed_case = true;
}

/* Compares the case's result with the `expect ... end` that follows it. */
static void check(int rc, const char *msg) {
    char kind[64];
    expect("expect");
    if (!next_word(kind)) malformed("expected \"error\" or \"outputs\"");
    if (strcmp(kind, "error") == 0) {
        int code;
        size_t len;
        if (fscanf(in, "%d", &code) != 1) malformed("expected an error code");
        const char *message = read_string(&len);
        if (rc == MC_OK)
            report("expected error %d (%s), the call succeeded", code, message);
        else if (rc != code)
            report("expected error %d (%s), got %d (%s)", code, message, rc, msg);
        else if (strcmp(msg, message) != 0)
            report("error %d: expected message \"%s\", got \"%s\"", code, message, msg);
    } else if (strcmp(kind, "outputs") == 0) {
        uint64_t count = read_uint();
        for (uint64_t i = 0; i < count; i++) {
            size_t len;
            expect("out");
            const char *label = read_string(&len);
            Array want = read_array();
            if (rc != MC_OK) continue; /* reported once below, after reading them all */
            const Output *got = find(label);
            if (!got) {
                report("output \"%s\" was not produced", label);
                continue;
            }
            if (got->a.dtype != want.dtype || got->a.n != want.n) {
                report("output \"%s\": expected %zu words of dtype %" PRIu32 ", got %zu of dtype %" PRIu32, label, want.n, want.dtype, got->a.n, got->a.dtype);
                continue;
            }
            size_t differ = 0, first = 0;
            for (size_t j = 0; j < want.n; j++)
                if (word_at(&got->a, j) != word_at(&want, j) && differ++ == 0) first = j;
            if (differ)
                report("output \"%s\": %zu of %zu words differ; first at %zu: expected %" PRIx32 ", got %" PRIx32, label, differ, want.n, first, word_at(&want, first), word_at(&got->a, first));
        }
        if (rc != MC_OK) report("expected outputs, got error %d: %s", rc, msg);
    } else {
        malformed("expected \"error\" or \"outputs\", found %s", kind);
    }
    expect("end");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s GOLDEN.txt...\n", argv[0]);
        return 2;
    }
    unsigned passed = 0, failed = 0;
    for (int f = 1; f < argc; f++) {
        in_path = argv[f];
        case_name = "(header)";
        in = fopen(in_path, "rb");
        if (!in) {
            perror(in_path);
            return 2;
        }
        char w[64];
        size_t len;
        arena_used = 0;
        expect("merge-core-capi-golden/1");
        read_string(&len); /* the JSON file it was written from */
        while (next_word(w)) {
            if (strcmp(w, "case") != 0) malformed("expected \"case\", found %s", w);
            arena_used = 0;
            output_count = 0;
            failed_case = false;
            case_name = read_string(&len);
            char op[64], msg[1024] = "";
            if (!next_word(op)) malformed("expected an op");
            int rc = strcmp(op, "optimizer") == 0     ? run_optimizer(msg, sizeof msg)
                     : strcmp(op, "linear") == 0      ? run_linear(msg, sizeof msg)
                     : strcmp(op, "interpolate") == 0 ? run_interpolate(msg, sizeof msg)
                     : strcmp(op, "slerp") == 0       ? run_slerp(msg, sizeof msg)
                     : strcmp(op, "gta") == 0         ? run_gta(msg, sizeof msg)
                                                      : (malformed("unknown op %s", op), 0);
            check(rc, msg);
            if (failed_case)
                failed++;
            else
                passed++;
        }
        fclose(in);
    }
    printf("golden.c (merge-core C ABI %s): %u passed, %u failed\n", mc_version(), passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}
