/* merge-core's C ABI: the online merging optimizers' per-tensor step, task-vector
 * init and offline merges, bit for bit as SPEC.md defines them.
 *
 * Every function that returns an int returns MC_OK (0) or a negative MC_ERR_* code,
 * and writes a NUL-terminated message (empty on success, cut to fit at a UTF-8
 * character boundary) into msg[0 .. msg_cap) unless msg is null. On failure
 * nothing is written, except where a function says otherwise. A pointer with an
 * element count must hold that many elements, aligned for its type; it may be
 * null only when the count is 0 or the argument is documented as optional. No
 * buffer a call writes may share memory with another buffer of the call. Names
 * are UTF-8, given as pointer and length. There is no global state. */

#ifndef MERGE_CORE_H
#define MERGE_CORE_H

/* Generated from capi/src/lib.rs by cbindgen (capi/cbindgen.toml): edit the Rust,
 * then run MERGE_CORE_CAPI_UPDATE=1 cargo test -p merge-core-capi to rewrite this file. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/**
 * Success.
 */
#define MC_OK 0

/**
 * A non-finite input or result; the message names the tensor, the value and the lowest element index.
 */
#define MC_ERR_NON_FINITE -1

/**
 * A hyperparameter out of its range; the message names it.
 */
#define MC_ERR_INVALID_HYPERPARAMETER -2

/**
 * Tensors that must have equal lengths do not (e.g. a missing optional buffer the step needs).
 */
#define MC_ERR_LENGTH_MISMATCH -3

/**
 * A result too large for its storage dtype.
 */
#define MC_ERR_STORAGE_OVERFLOW -4

/**
 * A whole-tensor reduction (an L1 or L2 norm, a dot product) is not finite.
 */
#define MC_ERR_NON_FINITE_REDUCTION -5

/**
 * An index or size the arithmetic cannot address (2^32 elements or more).
 */
#define MC_ERR_OUT_OF_RANGE -6

/**
 * A call against merge-core's contract (e.g. global-scope tensors out of name order).
 */
#define MC_ERR_MISUSE -7

/**
 * A null, misaligned or overlapping buffer, an unknown code, or a name that is not UTF-8.
 */
#define MC_ERR_INVALID_ARGUMENT -8

/**
 * A bug in merge-core or this ABI; the panic was caught before it reached the caller.
 */
#define MC_ERR_PANIC -9

/**
 * Storage dtype binary32 (`float`).
 */
#define MC_DTYPE_F32 0

/**
 * Storage dtype bfloat16 (`uint16_t` bits).
 */
#define MC_DTYPE_BF16 1

/**
 * Storage dtype IEEE binary16 (`uint16_t` bits).
 */
#define MC_DTYPE_F16 2

/**
 * The Hugging Face `transformers.AdamW` the official code builds on.
 */
#define MC_ADAM_HUGGING_FACE 0

/**
 * `torch.optim.AdamW`.
 */
#define MC_ADAM_TORCH 1

/**
 * A constant learning rate.
 */
#define MC_SCHEDULE_CONSTANT 0

/**
 * Linear warmup from 0 over `warmup` steps, then a half cosine down to 0 at `total`.
 */
#define MC_SCHEDULE_WARMUP_COSINE 1

/**
 * Plain AdamW.
 */
#define MC_MERGE_NONE 0

/**
 * OnDARE.
 */
#define MC_MERGE_DARE 1

/**
 * OnTIES.
 */
#define MC_MERGE_TIES 2

/**
 * What the official code does.
 */
#define MC_VARIANT_REFERENCE 0

/**
 * The paper's equations.
 */
#define MC_VARIANT_PAPER 1

/**
 * Top-k trimming ranks each tensor on its own.
 */
#define MC_SCOPE_PER_TENSOR 0

/**
 * Top-k trimming ranks all tensors of the call at once, concatenated in bytewise
 * ascending name order (the tensors must be given in that order).
 */
#define MC_SCOPE_GLOBAL 1

/**
 * Every task-vector element kept.
 */
#define MC_SPARSIFY_NONE 0

/**
 * TIES trim: the `ceil(density * n)` largest magnitudes kept.
 */
#define MC_SPARSIFY_MAGNITUDE 1

/**
 * DARE: each element kept with probability `density`, kept ones scaled by `1/density`.
 */
#define MC_SPARSIFY_RANDOM 2

/**
 * mergekit `task_arithmetic`.
 */
#define MC_GTA_TASK_ARITHMETIC 0

/**
 * mergekit `ties`.
 */
#define MC_GTA_TIES 1

/**
 * mergekit `dare_linear`.
 */
#define MC_GTA_DARE_LINEAR 2

/**
 * mergekit `dare_ties`.
 */
#define MC_GTA_DARE_TIES 3

/**
 * The Adam part of the optimizer (SPEC.md §5.1). Codes are plain integers, not
 * C enums, so that any value a caller passes can be checked rather than trusted.
 */
typedef struct McAdamConfig {
  /**
   * `MC_ADAM_HUGGING_FACE` or `MC_ADAM_TORCH`.
   */
  uint32_t form;
  /**
   * Peak learning rate, `>= 0`.
   */
  double lr;
  /**
   * `0 <= beta1 < 1`.
   */
  double beta1;
  /**
   * `0 <= beta2 < 1`.
   */
  double beta2;
  /**
   * `> 0` and a normal binary32 value after rounding.
   */
  double eps;
  /**
   * Decoupled weight decay `>= 0`.
   */
  double weight_decay;
  /**
   * `MC_SCHEDULE_CONSTANT` or `MC_SCHEDULE_WARMUP_COSINE`.
   */
  uint32_t schedule;
  /**
   * Warmup-cosine only: the warmup steps, `<= total`.
   */
  uint64_t warmup;
  /**
   * Warmup-cosine only: the step count at which the rate reaches 0, `>= 1`.
   */
  uint64_t total;
} McAdamConfig;

/**
 * What is merged into each update (SPEC.md §5.2, §5.3).
 */
typedef struct McMergeConfig {
  /**
   * `MC_MERGE_NONE`, `MC_MERGE_DARE` or `MC_MERGE_TIES`; the other fields are
   * read only by the methods named on them.
   */
  uint32_t method;
  /**
   * OnDARE, OnTIES: `MC_VARIANT_REFERENCE` or `MC_VARIANT_PAPER`.
   */
  uint32_t variant;
  /**
   * OnDARE, OnTIES: the reserve rate `p` in `(0, 1]`.
   */
  double p;
  /**
   * OnDARE, OnTIES: the merge weight `alpha` in `[0, 1]`.
   */
  double alpha;
  /**
   * OnDARE, OnTIES: L1 rescale of the sparsified update.
   */
  bool rescale;
  /**
   * OnDARE: the clip value `c > 0` of the task vector and the rescale.
   */
  double clip;
  /**
   * OnTIES: `MC_SCOPE_PER_TENSOR` or `MC_SCOPE_GLOBAL`.
   */
  uint32_t scope;
} McMergeConfig;

/**
 * Everything that defines an online merging optimizer run: merge-core's
 * `OnlineConfig`. Start from `mc_online_config_default()`.
 */
typedef struct McOnlineConfig {
  /**
   * AdamW.
   */
  struct McAdamConfig adam;
  /**
   * The merge method.
   */
  struct McMergeConfig merge;
  /**
   * Merge every `k` steps (step-K, SPEC.md §5.4), `>= 1`; 1 is online merging.
   */
  uint32_t k;
  /**
   * Seed of every random mask.
   */
  uint64_t seed;
} McOnlineConfig;

/**
 * The binary32 scalars of one step (SPEC.md §5.1), as the element arithmetic uses them.
 */
typedef struct McStepScalars {
  /**
   * The scheduled learning rate (informational).
   */
  float lr;
  /**
   * `beta1`, rounded.
   */
  float beta1;
  /**
   * `beta2`, rounded.
   */
  float beta2;
  /**
   * `RN(1 - beta1)`.
   */
  float one_minus_beta1;
  /**
   * `RN(1 - beta2)`.
   */
  float one_minus_beta2;
  /**
   * `eps`, rounded.
   */
  float eps;
  /**
   * The negated step size.
   */
  float neg_step_size;
  /**
   * torch: `RN(sqrt(1 - beta2^k))`; Hugging Face: 1 (unused).
   */
  float bc2_sqrt;
  /**
   * torch: `RN(1 - lr * weight_decay)`, applied before the update; Hugging Face: 1 (unused).
   */
  float decay_before;
  /**
   * Hugging Face: `RN(lr * weight_decay)`, applied after the update; torch: 0 (unused).
   */
  float decay_after;
  /**
   * Whether the step merges (`step % k == 0`) rather than only accumulating the cached delta.
   */
  bool merge_step;
} McStepScalars;

/**
 * A tensor the call reads, in one of the storage dtypes; its element count
 * comes with the call. `data` is `const float *` for `MC_DTYPE_F32`, `const
 * uint16_t *` (the bits) for `MC_DTYPE_BF16` and `MC_DTYPE_F16`.
 */
typedef struct McSrc {
  /**
   * `MC_DTYPE_F32`, `MC_DTYPE_BF16` or `MC_DTYPE_F16`.
   */
  uint32_t dtype;
  /**
   * The elements.
   */
  const void *data;
} McSrc;

/**
 * One tensor of `mc_step_tensors`: `n` elements in every buffer.
 */
typedef struct McStepJob {
  /**
   * The tensor's name, UTF-8, `name_len` bytes: its identity in the random masks.
   */
  const char *name;
  /**
   * Bytes of `name`.
   */
  size_t name_len;
  /**
   * Elements of every buffer below.
   */
  size_t n;
  /**
   * The gradient.
   */
  const float *grad;
  /**
   * The parameters, updated in place.
   */
  float *theta;
  /**
   * Adam's first moment, updated in place.
   */
  float *m;
  /**
   * Adam's second moment, updated in place.
   */
  float *v;
  /**
   * The cached delta of step-K (zeros before the first step), updated in place;
   * required when `k > 1`, null otherwise.
   */
  float *cached;
  /**
   * The stored task vector from `mc_init_task_vector(s)`; `data` may be null
   * for plain AdamW.
   */
  struct McSrc tau;
  /**
   * Room for the update, required by OnTIES, may be null otherwise.
   */
  float *scratch;
} McStepJob;

/**
 * A tensor the call writes, in one of the storage dtypes (as `McSrc`).
 */
typedef struct McDst {
  /**
   * `MC_DTYPE_F32`, `MC_DTYPE_BF16` or `MC_DTYPE_F16`.
   */
  uint32_t dtype;
  /**
   * The elements.
   */
  void *data;
} McDst;

/**
 * One tensor of `mc_init_task_vectors`: `n` elements in every buffer.
 */
typedef struct McTaskVectorJob {
  /**
   * The tensor's name, UTF-8, `name_len` bytes.
   */
  const char *name;
  /**
   * Bytes of `name`.
   */
  size_t name_len;
  /**
   * Elements of every buffer below.
   */
  size_t n;
  /**
   * The base (pretrained) weights.
   */
  struct McSrc base;
  /**
   * The SFT weights.
   */
  struct McSrc sft;
  /**
   * The stored task vector, written.
   */
  struct McDst out;
  /**
   * Room for the unsparsified task vector, required by OnTIES, may be null otherwise.
   */
  float *scratch;
} McTaskVectorJob;

/**
 * Generalized task arithmetic (SPEC.md §6.2): merge-core's `offline::Gta`.
 * Start from `mc_gta_preset`.
 */
typedef struct McGtaConfig {
  /**
   * `MC_SPARSIFY_NONE`, `MC_SPARSIFY_MAGNITUDE` or `MC_SPARSIFY_RANDOM`.
   */
  uint32_t sparsify;
  /**
   * TIES sign election.
   */
  bool consensus;
  /**
   * Divide by the (agreeing) weights.
   */
  bool normalize;
  /**
   * The factor of the mixed task vectors.
   */
  double lambda;
} McGtaConfig;

/**
 * The SLERP result's factors: `out = s0 * a + s1 * b`.
 */
typedef struct McSlerpScalars {
  /**
   * The factor of `a`.
   */
  float s0;
  /**
   * The factor of `b`.
   */
  float s1;
  /**
   * The tensors were (anti)parallel: linear interpolation was used.
   */
  bool lerp;
} McSlerpScalars;

/**
 * One model's weight and density in `mc_merge_gta`.
 */
typedef struct McModelParams {
  /**
   * The model's weight.
   */
  double weight;
  /**
   * The fraction its sparsification keeps, in `(0, 1]` (unused by `MC_SPARSIFY_NONE`).
   */
  double density;
} McModelParams;

/**
 * One tensor of `mc_merge_gta`: `n` elements in every buffer.
 */
typedef struct McGtaTensor {
  /**
   * The tensor's name, UTF-8, `name_len` bytes: its identity in the DARE masks.
   */
  const char *name;
  /**
   * Bytes of `name`.
   */
  size_t name_len;
  /**
   * Elements of every buffer below.
   */
  size_t n;
  /**
   * The base model's weights.
   */
  struct McSrc base;
  /**
   * One tensor per model, `model_count` of them.
   */
  const struct McSrc *models;
  /**
   * The merged weights, written.
   */
  struct McDst out;
} McGtaTensor;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * This library's version, a static NUL-terminated string.
 */
const char *mc_version(void);

/**
 * merge-core's default configuration: OnDARE with the paper's defaults
 * (`p = 0.01`, `alpha = 1e-7`, clip 1), Hugging Face AdamW with lr 1e-6,
 * `k = 1`, seed 0. Fields of the other methods hold their defaults too.
 */
struct McOnlineConfig mc_online_config_default(void);

/**
 * The scalars of step `step` (1-based) under `config`, and whether it merges.
 *
 * # Safety
 * `config` and `out` point to one valid value each; `msg` is null or `msg_cap` writable bytes.
 */
int mc_step_scalars(const struct McOnlineConfig *config,
                    uint64_t step,
                    struct McStepScalars *out,
                    char *msg,
                    size_t msg_cap);

/**
 * One optimizer step of one tensor, in place: step `step` (1-based) under
 * `config`. The result depends on `step`, not on how many calls came before,
 * so the caller keeps the count (SPEC.md §5).
 *
 * `theta`, `m`, `v` (and `cached` for step-K) are updated in place. `cached`
 * (zeros before the first step) is required when `config->k > 1`, else null.
 * `tau` is the stored task vector (`tau.data` may be null for plain AdamW).
 * `scratch` (n floats) is required by OnTIES, may be null otherwise. OnTIES with
 * `MC_SCOPE_GLOBAL` needs every tensor at once: use `mc_step_tensors` (this
 * function refuses it with `MC_ERR_MISUSE`).
 *
 * # Safety
 * `config` points to a valid configuration; `name` to `name_len` bytes; `grad`,
 * `theta`, `m`, `v`, and `cached`, `tau.data`, `scratch` when not null, to `n`
 * elements each; `msg` is null or `msg_cap` writable bytes.
 */
int mc_step_tensor(const struct McOnlineConfig *config,
                   uint64_t step,
                   const char *name,
                   size_t name_len,
                   const float *grad,
                   float *theta,
                   float *m,
                   float *v,
                   float *cached,
                   struct McSrc tau,
                   float *scratch,
                   size_t n,
                   char *msg,
                   size_t msg_cap);

/**
 * One optimizer step of `job_count` tensors, step `step` (1-based) under
 * `config`; each job as the arguments of `mc_step_tensor`. No tensor is written
 * unless every tensor passes. With OnTIES and `MC_SCOPE_GLOBAL` the jobs must
 * be in bytewise ascending name order and share one threshold.
 *
 * # Safety
 * `config` points to a valid configuration, `jobs` to `job_count` jobs whose
 * pointers are valid as `mc_step_tensor` describes; `msg` is null or `msg_cap`
 * writable bytes.
 */
int mc_step_tensors(const struct McOnlineConfig *config,
                    uint64_t step,
                    const struct McStepJob *jobs,
                    size_t job_count,
                    char *msg,
                    size_t msg_cap);

/**
 * Computes one tensor's stored task vector `tau'` from its base and SFT
 * weights (SPEC.md §5.2, §5.3), once before the first step, into `out` (any
 * storage dtype). `scratch` (n floats) is required by OnTIES, may be null
 * otherwise; OnTIES with `MC_SCOPE_GLOBAL` needs every tensor at once: use
 * `mc_init_task_vectors` (this function refuses it with `MC_ERR_MISUSE`).
 * Plain AdamW has no task vector (`MC_ERR_MISUSE`).
 *
 * # Safety
 * `config` points to a valid configuration; `name` to `name_len` bytes;
 * `base.data`, `sft.data`, `out.data`, and `scratch` when not null, to `n`
 * elements each; `msg` is null or `msg_cap` writable bytes.
 */
int mc_init_task_vector(const struct McOnlineConfig *config,
                        const char *name,
                        size_t name_len,
                        struct McSrc base,
                        struct McSrc sft,
                        struct McDst out,
                        float *scratch,
                        size_t n,
                        char *msg,
                        size_t msg_cap);

/**
 * Computes the stored task vectors of `job_count` tensors, each job as the
 * arguments of `mc_init_task_vector`. With OnTIES no tensor is written unless
 * every one passes, and with `MC_SCOPE_GLOBAL` the jobs must be in bytewise
 * ascending name order and share one threshold. With OnDARE each tensor is
 * validated before it is written, in order, so on failure the tensors before
 * the one named in the message have been written.
 *
 * # Safety
 * `config` points to a valid configuration, `jobs` to `job_count` jobs whose
 * pointers are valid as `mc_init_task_vector` describes; `msg` is null or
 * `msg_cap` writable bytes.
 */
int mc_init_task_vectors(const struct McOnlineConfig *config,
                         const struct McTaskVectorJob *jobs,
                         size_t job_count,
                         char *msg,
                         size_t msg_cap);

/**
 * The mergekit defaults of a generalized task arithmetic method
 * (`MC_GTA_TASK_ARITHMETIC`, `MC_GTA_TIES`, `MC_GTA_DARE_LINEAR`,
 * `MC_GTA_DARE_TIES`) into `out`.
 *
 * # Safety
 * `out` points to one writable `McGtaConfig`; `msg` is null or `msg_cap` writable bytes.
 */
int mc_gta_preset(uint32_t method,
                  struct McGtaConfig *out,
                  char *msg,
                  size_t msg_cap);

/**
 * Linear merge (mergekit `linear`, SPEC.md §6.1) of `model_count` tensors of
 * `n` elements: `sum(weights[i] * models[i])`, divided by `sum(weights)` when
 * `normalize`.
 *
 * # Safety
 * `name` points to `name_len` bytes; `models` and `weights` to `model_count`
 * entries each; every `models[i].data` and `out.data` to `n` elements; `msg` is
 * null or `msg_cap` writable bytes.
 */
int mc_merge_linear(const char *name,
                    size_t name_len,
                    const struct McSrc *models,
                    const double *weights,
                    size_t model_count,
                    bool normalize,
                    struct McDst out,
                    size_t n,
                    char *msg,
                    size_t msg_cap);

/**
 * The paper's SFT-to-RLHF interpolation (SPEC.md §6.4):
 * `out = sft + weight * (rlhf - sft)`, `weight` in `[0, 1]`.
 *
 * # Safety
 * `name` points to `name_len` bytes; `sft.data`, `rlhf.data`, `out.data` to `n`
 * elements each; `msg` is null or `msg_cap` writable bytes.
 */
int mc_merge_interpolate(const char *name,
                         size_t name_len,
                         struct McSrc sft,
                         struct McSrc rlhf,
                         double weight,
                         struct McDst out,
                         size_t n,
                         char *msg,
                         size_t msg_cap);

/**
 * SLERP (mergekit `slerp`, SPEC.md §6.3) between `a` and `b` with factor `t`
 * in `[0, 1]`; the factors it used go to `scalars` unless that is null.
 *
 * # Safety
 * `name` points to `name_len` bytes; `a.data`, `b.data`, `out.data` to `n`
 * elements each; `scalars` is null or one writable `McSlerpScalars`; `msg` is
 * null or `msg_cap` writable bytes.
 */
int mc_merge_slerp(const char *name,
                   size_t name_len,
                   struct McSrc a,
                   struct McSrc b,
                   double t,
                   struct McDst out,
                   size_t n,
                   struct McSlerpScalars *scalars,
                   char *msg,
                   size_t msg_cap);

/**
 * Generalized task arithmetic (mergekit's `task_arithmetic`, `ties`,
 * `dare_linear`, `dare_ties`; SPEC.md §6.2) of `tensor_count` tensors, each with
 * a base and `model_count` models weighted by `params`. `seed` draws the DARE
 * masks; `scope` says where `MC_SPARSIFY_MAGNITUDE` ranks (with
 * `MC_SCOPE_GLOBAL` the tensors must be in bytewise ascending name order).
 *
 * Every hyperparameter and trim threshold is computed before anything is
 * written; then the tensors are merged in order, each validated before it is
 * written, so on failure the tensors before the one named in the message have
 * been written.
 *
 * # Safety
 * `config` points to a valid `McGtaConfig`; `params` to `model_count` entries;
 * `tensors` to `tensor_count` entries whose `name` points to `name_len` bytes,
 * `models` to `model_count` `McSrc`, and whose `base.data`, `out.data` and
 * every model's `data` to `n` elements; `msg` is null or `msg_cap` writable bytes.
 */
int mc_merge_gta(const struct McGtaConfig *config,
                 uint64_t seed,
                 const struct McModelParams *params,
                 size_t model_count,
                 uint32_t scope,
                 const struct McGtaTensor *tensors,
                 size_t tensor_count,
                 char *msg,
                 size_t msg_cap);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* MERGE_CORE_H */
