//! Top-k by magnitude (SPEC.md §4): the exact keep count, the threshold `(T, c)`
//! with the lowest-index tie rule, and a radix select that finds it from integer
//! histograms only, so the answer cannot depend on chunking, feeding order or device.
//!
//! The select is a state machine over passes, each pass one histogram of
//! [`BUCKETS`] integer counts. A caller (the CPU optimizer, or the GPU runtime that
//! computes the same histograms in a shader and hands them in with
//! [`RadixSelect::add_histogram`]) loops:
//! ```text
//! while let Some(pass) = sel.pass() {
//!     for each chunk: sel.feed_values(offset, chunk)   // or add_histogram(...)
//!     sel.finish_pass()?;
//! }
//! let threshold = sel.threshold().unwrap();
//! ```
//! Key passes walk the 31 key bits in digits of 11, 11 and 9 bits, each later pass
//! counting only the candidates whose higher digits equal the digits already chosen.
//! When more elements tie at `T` than may be kept, index passes follow, which
//! select among the tied elements the `r`-th lowest index in the same way. When
//! every tie is kept, `c` is one past the last tie: the last key pass records it
//! per bucket while counting, so no index pass runs (histograms added from
//! elsewhere carry no indices, and then the index passes find it).
//!
//! For values held in memory, [`select_with_scratch`] and
//! [`RadixSelect::finish_in_memory`] run the passes; given scratch room, they
//! gather the candidates once so that the later passes do not rescan the data.

use crate::arith::flush;
use crate::error::{Error, TensorName, tensor_name};

/// Width of one radix digit. 11 bits keeps a histogram (2048 counters) inside a
/// GPU workgroup's shared memory and a CPU's L1 cache, and needs three key passes.
pub const DIGIT_BITS: u32 = 11;
/// Counters per histogram.
pub const BUCKETS: usize = 1 << DIGIT_BITS;
/// Bits of a magnitude key: the sign bit is cleared.
const KEY_BITS: u32 = 31;
const KEY_MAX: u32 = 0x7fff_ffff;

/// SPEC.md §4: `key(x) = bits(F(x)) & 0x7fff_ffff`, ordered as `|x|` is.
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    flush(x).to_bits() & KEY_MAX
}

/// The selection `(T, c)`: an element with magnitude key `key` at index `index`
/// (in the scope's sequence) is kept iff `key > T` or (`key == T` and `index < c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    /// `T`, the `k`-th largest key.
    pub key: u32,
    /// `c`: ties at `T` below this index are kept (one past the index of the last
    /// tie kept).
    pub cutoff: u64,
}

impl Threshold {
    /// Keeps nothing: the selection over an empty scope. No magnitude key exceeds
    /// `0x7fff_ffff`, and the cutoff 0 excludes every tie.
    pub const NOTHING: Threshold = Threshold { key: KEY_MAX, cutoff: 0 };

    /// Keeps every one of `n` elements (`k = n`). A caller may use it instead of
    /// running the select when `k = n`: the kept set is the same, only `T` differs
    /// from the select's (which would be the smallest key).
    pub const fn all(n: u64) -> Threshold {
        Threshold { key: 0, cutoff: n }
    }

    /// The keep decision. Branch-free so an element-wise loop stays vectorizable.
    #[inline(always)]
    pub fn keeps(&self, key: u32, index: u64) -> bool {
        (key > self.key) | ((key == self.key) & (index < self.cutoff))
    }

    /// The same decision for the elements of one chunk that starts at `offset`,
    /// by position `j < 2^32` within the chunk: all-`u32` compares vectorize well.
    pub fn local(&self, offset: u64) -> LocalThreshold {
        let cutoff = self.cutoff.saturating_sub(offset).min(u64::from(u32::MAX)) as u32;
        LocalThreshold { key: self.key, cutoff }
    }
}

/// A [`Threshold`] seen from one chunk ([`Threshold::local`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalThreshold {
    key: u32,
    cutoff: u32,
}

impl LocalThreshold {
    /// Whether the chunk's element `j` with magnitude key `key` is kept.
    #[inline(always)]
    pub fn keeps(&self, key: u32, j: u32) -> bool {
        (key > self.key) | ((key == self.key) & (j < self.cutoff))
    }
}

/// SPEC.md §4: `k = ⌈p·n⌉`, computed exactly from the bits of `p` and clamped to
/// `[1, n]` (0 when `n = 0`). `p` must be a normal binary32 in `(0, 1]`; `name` is
/// the hyperparameter's name for the error.
///
/// Exact means exact on the binary32 value: `0.1f32` is slightly above 1/10, so
/// `keep_count(0.1, 10)` is 2.
pub fn keep_count(name: &'static str, p: f32, n: u64) -> Result<u64, Error> {
    let bits = p.to_bits();
    // Zeros and subnormals (F flushes them to 0) have a zero exponent field; as
    // unsigned integers, NaN, ±Inf, negatives and p > 1 all compare above 1.0's bits.
    if bits & 0x7f80_0000 == 0 || bits > 1.0f32.to_bits() {
        return Err(Error::InvalidHyperparameter {
            name,
            value: p as f64,
            expected: "a keep fraction in (0, 1], a normal binary32",
        });
    }
    if n == 0 {
        return Ok(0);
    }
    // p = m · 2^-s with m the 24-bit significand and s = 150 - biased exponent.
    let m = u128::from((bits & 0x007f_ffff) | 0x0080_0000);
    let s = 150 - (bits >> 23);
    let prod = m * u128::from(n); // < 2^88
    let k = if s >= 128 {
        // p·n < 2^88 / 2^128 < 1 but positive: the ceiling is 1.
        1
    } else {
        ((prod + (1u128 << s) - 1) >> s) as u64
    };
    Ok(k.clamp(1, n))
}

/// An element carried between passes: its index in the scope's sequence and its
/// magnitude key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    pub index: u64,
    pub key: u32,
}

/// What one pass histograms. Exposed so that a GPU kernel can implement the same
/// filter and digit with the same numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Count digit `(key >> shift) & (2^bits − 1)` of every element whose higher
    /// key bits `key >> (shift + bits)` equal `prefix`.
    Key { shift: u32, bits: u32, prefix: u32 },
    /// Count digit `(index >> shift) & (2^bits − 1)` of every element whose key
    /// equals `key` (the threshold `T`) and whose higher index bits equal `prefix`.
    Index { key: u32, shift: u32, bits: u32, prefix: u64 },
}

impl Pass {
    /// The bucket an element falls in during this pass, `None` if it is not a candidate.
    #[inline(always)]
    pub fn bucket(&self, key: u32, index: u64) -> Option<usize> {
        match *self {
            Pass::Key { shift, bits, prefix } => {
                // shift + bits <= 31, so the shift is in range.
                if key >> (shift + bits) == prefix {
                    Some(((key >> shift) & digit_mask(bits)) as usize)
                } else {
                    None
                }
            }
            Pass::Index { key: t, shift, bits, prefix } => {
                if key == t && index.checked_shr(shift + bits).unwrap_or(0) == prefix {
                    Some(((index >> shift) & u64::from(digit_mask(bits))) as usize)
                } else {
                    None
                }
            }
        }
    }

    /// The index range `[start, end)` (clipped to `n` elements) outside which no
    /// element is a candidate: everything for key passes, one aligned block of
    /// `2^(shift + bits)` indices for index passes after the first.
    pub fn index_range(&self, n: u64) -> (u64, u64) {
        match *self {
            Pass::Key { .. } => (0, n),
            Pass::Index { shift, bits, prefix, .. } => {
                let width = shift + bits;
                if width >= 64 {
                    // The first index pass of a scope of more than 2^53 elements.
                    return (0, n);
                }
                let start = prefix << width;
                if start >> width != prefix {
                    return (n, n);
                }
                (start.min(n), start.saturating_add(1u64 << width).min(n))
            }
        }
    }

    /// Number of buckets this pass fills (`2^bits`).
    pub fn buckets(&self) -> usize {
        match *self {
            Pass::Key { bits, .. } | Pass::Index { bits, .. } => 1 << bits,
        }
    }
}

#[inline(always)]
fn digit_mask(bits: u32) -> u32 {
    ((1u32 << bits) - 1) & (BUCKETS as u32 - 1)
}

/// Radix select of the threshold `(T, c)` for the `k` largest magnitudes of `n`
/// elements (SPEC.md §4), fed in chunks with global offsets over several passes.
///
/// Within a pass, every candidate element must be fed exactly once, in any order
/// and any chunking; feeding elements that are not candidates is harmless (they are
/// filtered), so a caller may feed everything or only a compacted candidate list.
/// `finish_pass` checks that the histogram holds exactly as many elements as the
/// previous pass said were candidates, which catches a missing or doubled chunk.
#[derive(Clone, Debug)]
pub struct RadixSelect {
    scope: TensorName,
    n: u64,
    pass: Option<Pass>,
    /// Elements the current pass must count.
    candidates: u64,
    /// 1-based rank of the wanted element among the candidates: counted from the
    /// largest key in key passes, from the lowest index in index passes.
    rank: u64,
    index_bits: u32,
    result: Option<Threshold>,
    /// Totals of the current pass, filled from `lanes` by `flush_lanes`.
    hist: [u64; BUCKETS],
    /// Hot-loop counters: consecutive elements go to different lanes, so equal
    /// digits in a row (common: magnitudes cluster) do not serialize on one counter.
    lanes: [[u32; LANE_LEN]; LANES],
    /// Elements counted into `lanes` since they were last emptied (bounded so a
    /// `u32` lane cannot overflow).
    pending: u64,
    /// Last key pass only: one past the largest index counted in each bucket, so
    /// that when every tie is kept `c` is known without index passes.
    tie_end: [u64; LAST_BUCKETS],
    /// Whether `tie_end` saw every candidate (not so for histograms added from
    /// elsewhere, which then fall back to index passes).
    tie_end_valid: bool,
}

const LANES: usize = 4;
/// Buckets of the last key pass (its digit is the 9 bits left after two of 11).
const LAST_BUCKETS: usize = 1 << (KEY_BITS - 2 * DIGIT_BITS);
const LANE_LEN: usize = BUCKETS;
/// Keys from here up are Inf or NaN magnitudes (or not magnitude keys at all).
const NON_FINITE_KEY: u32 = 0x7f80_0000;

/// Fills `keys` with the keys of one block of at most [`BLOCK`] items, whose
/// first index in the scope is `start`, and returns the filled part; a
/// non-finite item is refused with the lowest such index. The keys are written
/// in place: returning the array by value copied it twice per block.
#[inline(always)]
fn block_keys<'k, T: Copy>(scope: &TensorName, start: u64, block: &[T], key: impl Fn(T) -> u32, keys: &'k mut [u32; BLOCK]) -> Result<&'k [u32], Error> {
    let filled = &mut keys[..block.len()];
    for (k, &x) in filled.iter_mut().zip(block) {
        *k = key(x);
    }
    if filled.iter().fold(0u32, |m, &k| m.max(k)) >= NON_FINITE_KEY {
        let at = filled.iter().position(|&k| k >= NON_FINITE_KEY).unwrap_or(0);
        return Err(Error::NonFinite { tensor: scope.clone(), what: "top-k input", index: start + at as u64 });
    }
    Ok(filled)
}

/// Elements per block of the counting loops (bits of the `u64` candidate mask).
const BLOCK: usize = 64;

/// Writes the elements of `values` (elements `offset ..` of a scope) whose
/// magnitude key is at least `bound` to the front of `out`, in index order, and
/// returns how many there are; `None` when they do not fit. The list that
/// [`RadixSelect::finish_among`] takes, gathered piece by piece. A non-finite
/// value is refused, naming the lowest index, as the select's passes do.
#[inline(always)]
pub fn gather_at_least(scope: &str, bound: u32, offset: u64, values: &[f32], out: &mut [Candidate]) -> Result<Option<usize>, Error> {
    // One vector pass refuses a non-finite value; the blocks then only compare.
    if values.iter().fold(0u32, |m, &x| m.max(x.to_bits() & KEY_MAX)) >= NON_FINITE_KEY {
        let at = values.iter().position(|&x| x.to_bits() & KEY_MAX >= NON_FINITE_KEY).unwrap_or(0);
        return Err(Error::NonFinite { tensor: tensor_name(scope), what: "top-k input", index: offset + at as u64 });
    }
    Ok(gather_finite_at_least(bound, offset, values, out))
}

/// [`gather_at_least`] over values already known finite (an update its pass
/// has validated), so nothing is refused.
#[inline(always)]
pub(crate) fn gather_finite_at_least(bound: u32, offset: u64, values: &[f32], out: &mut [Candidate]) -> Option<usize> {
    // Bit `j` set where `xs[j]` reaches the bound; 32 at a time, as in `candidate_hits`.
    let half = |xs: &[f32]| xs.iter().enumerate().fold(0u32, |m, (j, &x)| m | (u32::from(magnitude_key(x) >= bound) << j));
    let mut len = 0usize;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        let hits = match <&[f32; BLOCK]>::try_from(block) {
            Ok(full) => u64::from(half(&full[..32])) | (u64::from(half(&full[32..])) << 32),
            Err(_) => {
                let (low, high) = block.split_at(block.len().min(32));
                u64::from(half(low)) | (u64::from(half(high)) << 32)
            }
        };
        let start = offset + (b * BLOCK) as u64;
        for j in positions(hits) {
            let slot = out.get_mut(len)?;
            *slot = Candidate { index: start + j as u64, key: magnitude_key(block[j]) };
            len += 1;
        }
    }
    Some(len)
}

/// What a key is compared with to be a candidate of `pass`: its key bits above
/// the digit (shift, prefix) for key passes, or the whole key and `T` for index
/// passes (whose index condition the caller tests per hit with [`Pass::bucket`]).
#[inline(always)]
fn hit_test(pass: &Pass) -> (u32, u32) {
    match *pass {
        Pass::Key { shift, bits, prefix } => (shift + bits, prefix),
        Pass::Index { key, .. } => (0, key),
    }
}

/// How many of `keys` pass [`hit_test`]: a compare and an add per key, which
/// vectorize at every level, so that blocks without candidates (most of them in
/// the later passes) cost no more than their keys.
#[inline(always)]
fn hit_count(pass: &Pass, keys: &[u32]) -> usize {
    let (high, want) = hit_test(pass);
    keys.iter().fold(0u32, |n, &k| n + u32::from(k >> high == want)) as usize
}

/// The positions of the set bits of `mask`, ascending.
#[inline(always)]
fn positions(mut mask: u64) -> impl Iterator<Item = usize> {
    core::iter::from_fn(move || {
        (mask != 0).then(|| {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            j
        })
    })
}

/// Bit `j` set where `keys[j]` (at most [`BLOCK`] keys) passes [`hit_test`].
/// Built as two 32-bit halves: a default x86-64 build has no 64-bit shifts per
/// vector lane, and the halves measured faster there and the same with AVX2 and
/// AVX-512.
#[inline(always)]
fn candidate_hits(pass: &Pass, keys: &[u32]) -> u64 {
    let (high, want) = hit_test(pass);
    let half = |keys: &[u32]| keys.iter().enumerate().fold(0u32, |m, (j, &k)| m | (u32::from(k >> high == want) << j));
    let (low, high_half) = keys.split_at(keys.len().min(32));
    u64::from(half(low)) | (u64::from(half(high_half)) << 32)
}

impl RadixSelect {
    /// A select of the `k` largest among `n` elements. `scope` names the tensor (or
    /// the global scope) in errors. `k` must be in `[1, n]`, or 0 when `n = 0`.
    pub fn new(scope: &str, n: u64, k: u64) -> Result<RadixSelect, Error> {
        let scope = tensor_name(scope);
        if (n == 0 && k != 0) || (n > 0 && (k == 0 || k > n)) {
            return Err(Error::OutOfRange { tensor: scope, what: "top-k count k", value: k, limit: n });
        }
        let index_bits = if n <= 1 { 0 } else { 64 - (n - 1).leading_zeros() };
        let (pass, result) = if n == 0 {
            (None, Some(Threshold::NOTHING))
        } else {
            (Some(Pass::Key { shift: KEY_BITS - DIGIT_BITS, bits: DIGIT_BITS, prefix: 0 }), None)
        };
        Ok(RadixSelect {
            scope,
            n,
            pass,
            candidates: n,
            rank: k,
            index_bits,
            result,
            hist: [0; BUCKETS],
            lanes: [[0; LANE_LEN]; LANES],
            pending: 0,
            tie_end: [0; LAST_BUCKETS],
            tie_end_valid: true,
        })
    }

    /// The pass to run next, `None` once the threshold is known.
    pub fn pass(&self) -> Option<Pass> {
        self.pass
    }

    /// The threshold, once every pass has finished.
    pub fn threshold(&self) -> Option<Threshold> {
        self.result
    }

    /// The rank, among the current pass's candidates, of the element the select
    /// looks for: the keep count `k` in the first pass.
    pub fn rank(&self) -> u64 {
        self.rank
    }

    /// Number of elements the current pass must count (0 when done).
    pub fn candidates(&self) -> u64 {
        if self.pass.is_some() { self.candidates } else { 0 }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), Error> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.n => Ok(()),
            _ => Err(Error::OutOfRange {
                tensor: self.scope.clone(),
                what: "top-k chunk end (offset + length)",
                value: end.unwrap_or(u64::MAX),
                limit: self.n,
            }),
        }
    }

    /// Feeds magnitude keys of elements `offset .. offset + keys.len()`. A key of
    /// `0x7f80_0000` or more (a non-finite value, or a sign bit left set) is refused,
    /// naming the lowest such index; after an error the select must be discarded.
    pub fn feed_keys(&mut self, offset: u64, keys: &[u32]) -> Result<(), Error> {
        self.check_range(offset, keys.len())?;
        self.count(offset, keys, |k| k)
    }

    /// Feeds values (their magnitude keys) of elements `offset .. offset + values.len()`.
    /// A non-finite value is refused, naming the lowest index; after an error the
    /// select must be discarded.
    #[inline(always)]
    pub fn feed_values(&mut self, offset: u64, values: &[f32]) -> Result<(), Error> {
        self.check_range(offset, values.len())?;
        self.count(offset, values, magnitude_key)
    }

    /// Adds the counts of `part`: a copy of this select taken at the start of the
    /// current pass and fed other elements than this one (one copy per thread,
    /// each over its own chunks). The pass then finishes as if this select had
    /// been fed all of them: counts are integers, so the order parts are added in
    /// changes nothing.
    pub fn absorb(&mut self, part: &RadixSelect) -> Result<(), Error> {
        if part.n != self.n || part.pass != self.pass || part.candidates != self.candidates || part.rank != self.rank {
            return Err(Error::Misuse { what: "a top-k part copied from this select in its current pass" });
        }
        if self.pass.is_none() {
            return Ok(());
        }
        self.flush_lanes();
        for (b, h) in self.hist.iter_mut().enumerate() {
            *h += part.hist[b] + part.lanes.iter().map(|lane| u64::from(lane[b])).sum::<u64>();
        }
        for (t, &e) in self.tie_end.iter_mut().zip(&part.tie_end) {
            *t = (*t).max(e);
        }
        self.tie_end_valid &= part.tie_end_valid;
        Ok(())
    }

    /// Feeds elements by explicit index (e.g. candidates gathered in an earlier
    /// pass): any set that holds every candidate of the current pass exactly once.
    pub fn feed_candidates(&mut self, candidates: &[Candidate]) -> Result<(), Error> {
        let Some(pass) = self.pass else { return Ok(()) };
        if self.pending + candidates.len() as u64 > u64::from(u32::MAX) {
            self.flush_lanes();
        }
        self.pending += candidates.len() as u64;
        for c in candidates {
            if c.index >= self.n {
                return Err(Error::OutOfRange { tensor: self.scope.clone(), what: "top-k element index", value: c.index, limit: self.n });
            }
            if c.key >= NON_FINITE_KEY {
                return Err(Error::NonFinite { tensor: self.scope.clone(), what: "top-k input", index: c.index });
            }
            if let Some(b) = pass.bucket(c.key, c.index) {
                self.lanes[0][b] += 1;
                if let Pass::Key { shift: 0, .. } = pass {
                    let end = &mut self.tie_end[b % LAST_BUCKETS];
                    *end = (*end).max(c.index + 1);
                }
            }
        }
        Ok(())
    }

    /// Writes the current pass's candidates among `values` (elements `offset ..`)
    /// to the front of `out`, in index order, and returns how many there are;
    /// `None` when they do not fit. Changes nothing, so several threads may
    /// gather from one select at once, each from its own elements.
    #[inline(always)]
    pub fn gather_candidates(&self, offset: u64, values: &[f32], out: &mut [Candidate]) -> Result<Option<usize>, Error> {
        let Some(pass) = self.pass else { return Ok(Some(0)) };
        self.check_range(offset, values.len())?;
        let index_pass = matches!(pass, Pass::Index { .. });
        let mut len = 0usize;
        let mut key_buf = [0u32; BLOCK];
        for (b, block) in values.chunks(BLOCK).enumerate() {
            let start = offset + (b * BLOCK) as u64;
            let keys = block_keys(&self.scope, start, block, magnitude_key, &mut key_buf)?;
            if hit_count(&pass, keys) == 0 {
                continue;
            }
            for j in positions(candidate_hits(&pass, keys)) {
                let index = start + j as u64;
                if index_pass && pass.bucket(keys[j], index).is_none() {
                    continue;
                }
                let Some(slot) = out.get_mut(len) else { return Ok(None) };
                *slot = Candidate { index, key: keys[j] };
                len += 1;
            }
        }
        Ok(Some(len))
    }

    /// Stores the current key pass's candidates among `tensors` (the whole scope,
    /// concatenated) in `scratch`; `None` when they do not fit.
    fn gather<'a>(&self, tensors: impl Iterator<Item = &'a [f32]>, scratch: &mut [Candidate]) -> Result<Option<usize>, Error> {
        if !matches!(self.pass, Some(Pass::Key { .. })) || self.candidates > scratch.len() as u64 {
            return Ok(None);
        }
        let mut len = 0usize;
        let mut offset = 0u64;
        for t in tensors {
            let Some(found) = self.gather_candidates(offset, t, &mut scratch[len..])? else { return Ok(None) };
            len += found;
            offset += t.len() as u64;
        }
        Ok(Some(len))
    }

    /// Finishes a select still in its first pass from `candidates` alone: elements
    /// of the scope, each once, that hold every element whose magnitude key is at
    /// least some bound `L`, and at least `k` of them (`k` the select's keep
    /// count). The `k` largest keys are then all at least `L`, and so is every
    /// tie at the threshold, so the threshold is the whole scope's, whatever `L`
    /// was. Each pass narrows the list (in place, order kept) to the next pass's
    /// candidates. Fewer than `k` candidates, or a select past its first pass,
    /// is refused; a list that lacks an element at or above its smallest key
    /// cannot be detected and gives a wrong threshold.
    pub fn finish_among(&mut self, candidates: &mut [Candidate]) -> Result<Threshold, Error> {
        let first = Pass::Key { shift: KEY_BITS - DIGIT_BITS, bits: DIGIT_BITS, prefix: 0 };
        if self.pass != Some(first) || self.candidates != self.n || (candidates.len() as u64) < self.rank {
            return Err(Error::Misuse { what: "a select in its first pass, and at least k candidates" });
        }
        self.candidates = candidates.len() as u64;
        let mut len = candidates.len();
        while self.pass.is_some() {
            self.feed_candidates(&candidates[..len])?;
            self.finish_pass()?;
            if let Some(pass) = self.pass {
                let mut kept = 0;
                for i in 0..len {
                    if pass.bucket(candidates[i].key, candidates[i].index).is_some() {
                        candidates[kept] = candidates[i];
                        kept += 1;
                    }
                }
                len = kept;
            }
        }
        Ok(self.result.unwrap_or(Threshold::NOTHING))
    }

    /// Runs every remaining pass over the whole scope held in memory: `tensors`
    /// (an iterator that can be restarted, e.g. `slices.iter().copied()`)
    /// concatenated in scope order, none of them fed to the current pass yet. The
    /// first pass may have been run by the caller (fused with computing the
    /// values, then [`finish_pass`](Self::finish_pass)). When the second pass's
    /// candidates fit in `scratch`, one scan gathers them and every later pass
    /// runs over that list only; otherwise each pass scans everything.
    pub fn finish_in_memory<'a>(
        &mut self,
        tensors: impl Iterator<Item = &'a [f32]> + Clone,
        scratch: &mut [Candidate],
    ) -> Result<Threshold, Error> {
        let n: u64 = tensors.clone().map(|t| t.len() as u64).sum();
        if n != self.n {
            return Err(Error::LengthMismatch { tensor: self.scope.clone(), what: "top-k scope", expected: self.n, found: n });
        }
        let mut gathered: Option<usize> = None;
        while let Some(pass) = self.pass {
            if gathered.is_none() && !matches!(pass, Pass::Key { shift, bits, .. } if shift + bits == KEY_BITS) {
                gathered = self.gather(tensors.clone(), scratch)?;
            }
            match gathered {
                Some(len) => self.feed_candidates(&scratch[..len])?,
                None => {
                    let (lo, hi) = pass.index_range(self.n);
                    let mut offset = 0u64;
                    for t in tensors.clone() {
                        let end = offset + t.len() as u64;
                        let (a, b) = (lo.max(offset), hi.min(end));
                        if a < b {
                            self.feed_values(a, &t[(a - offset) as usize..(b - offset) as usize])?;
                        }
                        offset = end;
                    }
                }
            }
            self.finish_pass()?;
        }
        Ok(self.result.unwrap_or(Threshold::NOTHING))
    }

    fn flush_lanes(&mut self) {
        for lane in self.lanes.iter_mut() {
            for (h, c) in self.hist.iter_mut().zip(lane.iter_mut()) {
                *h += u64::from(*c);
                *c = 0;
            }
        }
        self.pending = 0;
    }

    /// Counts `items` (elements `offset ..`) into the lanes, `key` giving an item's
    /// magnitude key. Keys are made a block at a time (vectorizable), checked, and
    /// turned into a mask of the block's candidates; a block whose every key is a
    /// candidate of a key pass is counted densely ([`Self::count_dense`]), any
    /// other one candidate by candidate.
    #[inline(always)]
    fn count<T: Copy>(&mut self, offset: u64, items: &[T], key: impl Fn(T) -> u32) -> Result<(), Error> {
        let Some(pass) = self.pass else { return Ok(()) };
        if self.pending + items.len() as u64 > u64::from(u32::MAX) {
            self.flush_lanes();
        }
        self.pending += items.len() as u64;
        // The last key pass's tie ends of this call: its indices increase, so a
        // store per element keeps each bucket's last one, with no wait on the
        // previous value; they join `tie_end` (by maximum) at the end.
        let mut ends = [0u64; LAST_BUCKETS];
        let mut key_buf = [0u32; BLOCK];
        for (b, block) in items.chunks(BLOCK).enumerate() {
            let start = offset + (b * BLOCK) as u64;
            let keys = block_keys(&self.scope, start, block, &key, &mut key_buf)?;
            match pass {
                // The first pass: every element is a candidate. Its digit is
                // always the top one, and a shift by a constant is one
                // instruction where a shift by a variable is three.
                Pass::Key { shift, bits, .. } if shift + bits == KEY_BITS => {
                    debug_assert_eq!((shift, bits), (KEY_BITS - DIGIT_BITS, DIGIT_BITS));
                    self.count_dense(start, keys, KEY_BITS - DIGIT_BITS, digit_mask(DIGIT_BITS), &mut ends)
                }
                Pass::Key { shift, bits, .. } => {
                    let hit = hit_count(&pass, keys);
                    if hit == keys.len() {
                        self.count_dense(start, keys, shift, digit_mask(bits), &mut ends);
                        continue;
                    }
                    if hit == 0 {
                        continue;
                    }
                    let mask = digit_mask(bits);
                    for j in positions(candidate_hits(&pass, keys)) {
                        let d = ((keys[j] >> shift) & mask) as usize;
                        self.lanes[j % LANES][d] += 1;
                        if shift == 0 {
                            ends[d % LAST_BUCKETS] = start + j as u64 + 1;
                        }
                    }
                }
                Pass::Index { .. } => {
                    if hit_count(&pass, keys) == 0 {
                        continue;
                    }
                    for j in positions(candidate_hits(&pass, keys)) {
                        if let Some(bucket) = pass.bucket(keys[j], start + j as u64) {
                            self.lanes[0][bucket] += 1;
                        }
                    }
                }
            }
        }
        if let Pass::Key { shift: 0, .. } = pass {
            for (t, &e) in self.tie_end.iter_mut().zip(&ends) {
                *t = (*t).max(e);
            }
        }
        Ok(())
    }

    /// Counts digit `(key >> shift) & mask` of every key of a block (elements
    /// `start ..`), and in the last key pass records tie ends in `ends` (see
    /// [`Self::count`]). Magnitudes cluster (an Adam update is often nearly one
    /// magnitude), so a block whose digits are all equal is one addition; the
    /// others go round the lanes, so that equal digits in a row do not wait on
    /// one counter.
    #[inline(always)]
    fn count_dense(&mut self, start: u64, keys: &[u32], shift: u32, mask: u32, ends: &mut [u64; LAST_BUCKETS]) {
        let digit = |k: u32| (k >> shift) & mask;
        let first = digit(keys[0]);
        if keys.iter().fold(0u32, |acc, &k| acc | (digit(k) ^ first)) == 0 {
            self.lanes[0][first as usize] += keys.len() as u32;
            if shift == 0 {
                ends[first as usize % LAST_BUCKETS] = start + keys.len() as u64;
            }
            return;
        }
        let [l0, l1, l2, l3] = &mut self.lanes;
        let (quads, rest) = keys.as_chunks::<LANES>();
        for q in quads {
            l0[digit(q[0]) as usize] += 1;
            l1[digit(q[1]) as usize] += 1;
            l2[digit(q[2]) as usize] += 1;
            l3[digit(q[3]) as usize] += 1;
        }
        for &k in rest {
            l0[digit(k) as usize] += 1;
        }
        if shift == 0 {
            for (j, &k) in keys.iter().enumerate() {
                ends[digit(k) as usize % LAST_BUCKETS] = start + j as u64 + 1;
            }
        }
    }

    /// Adds a histogram computed elsewhere (a GPU kernel) for the current pass:
    /// `counts.len()` must be the pass's [`Pass::buckets`]. Such counts carry no
    /// indices, so if every tie turns out to be kept, index passes find `c`.
    pub fn add_histogram(&mut self, counts: &[u32]) -> Result<(), Error> {
        self.check_histogram(counts.len(), "top-k histogram")?;
        self.tie_end_valid = false;
        for (h, &c) in self.hist.iter_mut().zip(counts) {
            *h += u64::from(c);
        }
        Ok(())
    }

    /// [`add_histogram`](Self::add_histogram) for the last key pass
    /// (`Pass::Key { shift: 0, .. }`) together with, per bucket, one past the
    /// largest index counted there (0 for none; e.g. a GPU's `atomicMax` of
    /// `index + 1`), so that no index pass is needed when every tie is kept.
    pub fn add_histogram_with_tie_ends(&mut self, counts: &[u32], ends: &[u64]) -> Result<(), Error> {
        if !matches!(self.pass, Some(Pass::Key { shift: 0, .. })) {
            return Err(Error::LengthMismatch {
                tensor: self.scope.clone(),
                what: "tie ends outside the last key pass of a top-k select",
                expected: 0,
                found: ends.len() as u64,
            });
        }
        self.check_histogram(counts.len(), "top-k histogram")?;
        self.check_histogram(ends.len(), "top-k tie ends")?;
        for ((h, &c), (t, &e)) in self.hist.iter_mut().zip(counts).zip(self.tie_end.iter_mut().zip(ends)) {
            *h += u64::from(c);
            *t = (*t).max(e);
        }
        Ok(())
    }

    fn check_histogram(&self, len: usize, what: &'static str) -> Result<(), Error> {
        let Some(pass) = self.pass else {
            return Err(Error::LengthMismatch {
                tensor: self.scope.clone(),
                what: "histogram for a finished top-k select",
                expected: 0,
                found: len as u64,
            });
        };
        if len != pass.buckets() {
            return Err(Error::LengthMismatch { tensor: self.scope.clone(), what, expected: pass.buckets() as u64, found: len as u64 });
        }
        Ok(())
    }

    /// Ends the current pass: picks the digit holding the wanted element and sets up
    /// the next pass. Returns the threshold when the select is complete.
    pub fn finish_pass(&mut self) -> Result<Option<Threshold>, Error> {
        let Some(pass) = self.pass else { return Ok(self.result) };
        self.flush_lanes();
        let nb = pass.buckets();
        let total: u64 = self.hist[..nb].iter().sum();
        if total != self.candidates {
            return Err(Error::LengthMismatch {
                tensor: self.scope.clone(),
                what: "elements counted in a top-k pass",
                expected: self.candidates,
                found: total,
            });
        }
        match pass {
            Pass::Key { shift, bits, prefix } => {
                // Walk digits from the largest; `above` counts candidates with larger digits.
                let (d, above) = locate(&self.hist, (0..nb).rev(), self.rank);
                let digit = d as u32;
                self.rank -= above;
                self.candidates = self.hist[digit as usize];
                let prefix = (prefix << bits) | digit;
                if shift == 0 {
                    // `prefix` is now T; `candidates` elements tie at T, `rank` of them
                    // are kept. When that is all of them, c is one past the last tie.
                    if self.rank == self.candidates && self.tie_end_valid {
                        self.finish(Threshold { key: prefix, cutoff: self.tie_end[digit as usize % LAST_BUCKETS] });
                    } else {
                        let ib = self.index_bits;
                        let s = ib.saturating_sub(DIGIT_BITS);
                        self.pass = Some(Pass::Index { key: prefix, shift: s, bits: ib - s, prefix: 0 });
                    }
                } else {
                    let s = shift.saturating_sub(DIGIT_BITS);
                    self.pass = Some(Pass::Key { shift: s, bits: shift - s, prefix });
                }
            }
            Pass::Index { key, shift, bits, prefix } => {
                // Walk digits from the lowest; `below` counts tied candidates with lower indices.
                let (d, below) = locate(&self.hist, 0..nb, self.rank);
                let digit = d as u64;
                self.rank -= below;
                self.candidates = self.hist[digit as usize];
                let prefix = (prefix << bits) | digit;
                if shift == 0 {
                    // Indices are unique: exactly one element can remain.
                    if self.candidates != 1 {
                        return Err(Error::LengthMismatch {
                            tensor: self.scope.clone(),
                            what: "elements fed with the same top-k index",
                            expected: 1,
                            found: self.candidates,
                        });
                    }
                    self.finish(Threshold { key, cutoff: prefix + 1 });
                } else {
                    let s = shift.saturating_sub(DIGIT_BITS);
                    self.pass = Some(Pass::Index { key, shift: s, bits: shift - s, prefix });
                }
            }
        }
        self.hist = [0; BUCKETS];
        self.tie_end = [0; LAST_BUCKETS];
        self.tie_end_valid = true;
        Ok(self.result)
    }

    fn finish(&mut self, t: Threshold) {
        self.pass = None;
        self.result = Some(t);
    }
}

/// The bucket of `hist`, walked in `order`, that holds the `rank`-th candidate, and
/// how many candidates the buckets walked before it hold.
fn locate(hist: &[u64], order: impl Iterator<Item = usize>, rank: u64) -> (usize, u64) {
    let mut before = 0u64;
    for d in order {
        let c = hist[d];
        if before + c >= rank {
            return (d, before);
        }
        before += c;
    }
    (0, before)
}

/// The threshold for the `k` largest magnitudes over `tensors` concatenated in the
/// order given (SPEC.md §4: pass them in bytewise name order for global scope; one
/// slice for per-tensor scope). Runs every pass over the in-memory slices.
pub fn select(scope: &str, tensors: &[&[f32]], k: u64) -> Result<Threshold, Error> {
    select_with_scratch(scope, tensors, k, &mut [])
}

/// [`select`] with room for the candidates after the first pass: when they fit,
/// two scans of the data suffice (see [`RadixSelect::finish_in_memory`]).
pub fn select_with_scratch(scope: &str, tensors: &[&[f32]], k: u64, scratch: &mut [Candidate]) -> Result<Threshold, Error> {
    let n: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    RadixSelect::new(scope, n, k)?.finish_in_memory(tensors.iter().copied(), scratch)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::rng::SplitMix64;
    use std::vec::Vec;

    /// Uniform below `n` (test inputs only; the modulo bias is irrelevant here).
    fn below(rng: &mut SplitMix64, n: u64) -> u64 {
        rng.next_u64() % n
    }

    /// Sort-based oracle: the kept set and the canonical (T, c) straight from SPEC §4.
    fn oracle(values: &[f32], k: usize) -> (Vec<bool>, Threshold) {
        let n = values.len();
        let keys: Vec<u32> = values.iter().map(|&v| magnitude_key(v)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        let mut kept = std::vec![false; n];
        for &i in &order[..k] {
            kept[i] = true;
        }
        let t = keys[order[k - 1]];
        let greater = keys.iter().filter(|&&x| x > t).count();
        let r = k - greater;
        let cutoff = {
            // smallest c with #{i < c : key_i = T} = r
            let mut seen = 0;
            let mut c = 0;
            for (i, &x) in keys.iter().enumerate() {
                if x == t {
                    seen += 1;
                    if seen == r {
                        c = i + 1;
                        break;
                    }
                }
            }
            c as u64
        };
        (kept, Threshold { key: t, cutoff })
    }

    /// Values with many ties: a tiny set (with both zeros and a subnormal, which
    /// flushes to the same key as zero), bf16-rounded values, or plain random.
    fn values_of(rng: &mut SplitMix64, n: usize, kind: u64) -> Vec<f32> {
        const TINY: [f32; 8] = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 1.0e-40, 3.5];
        (0..n)
            .map(|_| match kind {
                0 => TINY[below(rng, 8) as usize],
                1 => {
                    let x = f32::from_bits((rng.next_u32()) & 0xbf7f_ffff); // |x| < 2
                    f32::from_bits(x.to_bits() & 0xffff_0000)
                }
                2 => 0.0,
                3 => f32::from_bits((0x3f80_0000 + below(rng, 4) as u32) ^ ((rng.next_u32()) & 0x8000_0000)),
                _ => f32::from_bits((rng.next_u32()) & 0xbfff_ffff),
            })
            .collect()
    }

    /// Runs the select with random chunking and a random chunk order per pass.
    fn chunked(rng: &mut SplitMix64, values: &[f32], k: u64) -> Threshold {
        let n = values.len();
        let mut sel = RadixSelect::new("t", n as u64, k).unwrap();
        while sel.pass().is_some() {
            let mut cuts = std::vec![0usize];
            while *cuts.last().unwrap() < n {
                let step = 1 + below(rng, 9) as usize;
                cuts.push((cuts.last().unwrap() + step).min(n));
            }
            let mut chunks: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
            for i in (1..chunks.len()).rev() {
                chunks.swap(i, below(rng, i as u64 + 1) as usize);
            }
            for (a, b) in chunks {
                sel.feed_values(a as u64, &values[a..b]).unwrap();
            }
            sel.finish_pass().unwrap();
        }
        sel.threshold().unwrap()
    }

    fn check(values: &[f32], k: usize, got: Threshold) {
        let (kept, want) = oracle(values, k);
        assert_eq!(got, want, "n={} k={k} values={values:?}", values.len());
        let mut count = 0;
        for (i, &v) in values.iter().enumerate() {
            let keep = got.keeps(magnitude_key(v), i as u64);
            assert_eq!(keep, kept[i], "element {i} n={} k={k}", values.len());
            count += keep as usize;
        }
        assert_eq!(count, k);
    }

    #[test]
    fn every_k_on_small_inputs_matches_the_oracle() {
        let mut rng = SplitMix64::new(1);
        for n in 1..=40usize {
            for kind in 0..5 {
                let values = values_of(&mut rng, n, kind);
                for k in 1..=n {
                    check(&values, k, select("t", &[&values], k as u64).unwrap());
                    let mut scratch = std::vec![Candidate::default(); n];
                    check(&values, k, select_with_scratch("t", &[&values], k as u64, &mut scratch).unwrap());
                    check(&values, k, chunked(&mut rng, &values, k as u64));
                }
            }
        }
    }

    #[test]
    fn large_inputs_with_many_ties_match_the_oracle() {
        let mut rng = SplitMix64::new(2);
        for round in 0..30 {
            let n = 1 + below(&mut rng, 6000) as usize;
            let values = values_of(&mut rng, n, round % 5);
            let ks = [1, n, 1 + below(&mut rng, n as u64) as usize, n / 2 + 1];
            for &k in &ks {
                let whole = select("t", &[&values], k as u64).unwrap();
                check(&values, k, whole);
                // Scratch for every candidate, for some, for none: same threshold.
                for room in [n, n / 20, 0] {
                    let mut scratch = std::vec![Candidate::default(); room];
                    assert_eq!(select_with_scratch("t", &[&values], k as u64, &mut scratch).unwrap(), whole);
                }
                assert_eq!(chunked(&mut rng, &values, k as u64), whole);
            }
        }
    }

    #[test]
    fn index_passes_run_when_ties_exceed_what_is_kept() {
        // 5000 equal values: T is their key and c = k; index bits span two digits.
        let values = std::vec![0.25f32; 5000];
        let mut sel = RadixSelect::new("t", 5000, 1234).unwrap();
        let mut index_passes = 0;
        while let Some(p) = sel.pass() {
            if matches!(p, Pass::Index { .. }) {
                index_passes += 1;
            }
            sel.feed_values(0, &values).unwrap();
            sel.finish_pass().unwrap();
        }
        assert_eq!(index_passes, 2);
        assert_eq!(sel.threshold(), Some(Threshold { key: 0.25f32.to_bits(), cutoff: 1234 }));
    }

    #[test]
    fn global_scope_over_several_tensors_is_one_concatenated_sequence() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..20 {
            let parts: Vec<Vec<f32>> = (0..1 + below(&mut rng, 5))
                .map(|i| {
                    let len = below(&mut rng, 300) as usize;
                    values_of(&mut rng, len, i % 5)
                })
                .collect();
            let all: Vec<f32> = parts.iter().flatten().copied().collect();
            if all.is_empty() {
                continue;
            }
            let slices: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            let k = 1 + below(&mut rng, all.len() as u64) as usize;
            check(&all, k, select("<global>", &slices, k as u64).unwrap());
            let mut scratch = std::vec![Candidate::default(); all.len()];
            check(&all, k, select_with_scratch("<global>", &slices, k as u64, &mut scratch).unwrap());
        }
    }

    #[test]
    fn histograms_from_elsewhere_give_the_same_threshold() {
        // What the GPU runtime does: compute each pass's histogram with Pass::bucket
        // and hand it in as u32 counts.
        let mut rng = SplitMix64::new(4);
        let values = values_of(&mut rng, 3000, 3);
        let mut sel = RadixSelect::new("t", 3000, 700).unwrap();
        while let Some(pass) = sel.pass() {
            let mut h = std::vec![0u32; pass.buckets()];
            for (i, &v) in values.iter().enumerate() {
                if let Some(b) = pass.bucket(magnitude_key(v), i as u64) {
                    h[b] += 1;
                }
            }
            sel.add_histogram(&h).unwrap();
            sel.finish_pass().unwrap();
        }
        assert_eq!(sel.threshold().unwrap(), select("t", &[&values], 700).unwrap());
    }

    #[test]
    fn histograms_with_tie_ends_skip_the_index_passes() {
        let mut rng = SplitMix64::new(8);
        for kind in 0..5 {
            let values = values_of(&mut rng, 3000, kind);
            for k in [1u64, 17, 1500, 3000] {
                let mut sel = RadixSelect::new("t", 3000, k).unwrap();
                while let Some(pass) = sel.pass() {
                    let mut h = std::vec![0u32; pass.buckets()];
                    let mut ends = std::vec![0u64; pass.buckets()];
                    for (i, &v) in values.iter().enumerate() {
                        if let Some(b) = pass.bucket(magnitude_key(v), i as u64) {
                            h[b] += 1;
                            ends[b] = ends[b].max(i as u64 + 1);
                        }
                    }
                    if let Pass::Key { shift: 0, .. } = pass {
                        sel.add_histogram_with_tie_ends(&h, &ends).unwrap();
                    } else {
                        assert!(sel.add_histogram_with_tie_ends(&h, &ends).is_err());
                        sel.add_histogram(&h).unwrap();
                    }
                    let before = sel.pass();
                    sel.finish_pass().unwrap();
                    // An index pass only runs when fewer ties are kept than there are.
                    if let (Some(Pass::Key { shift: 0, .. }), Some(Pass::Index { .. })) = (before, sel.pass()) {
                        let (_, want) = oracle(&values, k as usize);
                        let ties = values.iter().filter(|&&v| magnitude_key(v) == want.key).count();
                        let greater = values.iter().filter(|&&v| magnitude_key(v) > want.key).count();
                        assert!(k as usize - greater < ties);
                    }
                }
                assert_eq!(sel.threshold().unwrap(), select("t", &[&values], k).unwrap());
            }
        }
    }

    #[test]
    fn index_ranges_hold_every_candidate() {
        // Every candidate of every pass lies inside the pass's index range.
        let mut rng = SplitMix64::new(9);
        for _ in 0..30 {
            let n = 1 + below(&mut rng, 20_000) as usize;
            let values = values_of(&mut rng, n, 3);
            let k = 1 + below(&mut rng, n as u64);
            let mut sel = RadixSelect::new("t", n as u64, k).unwrap();
            while let Some(pass) = sel.pass() {
                let (lo, hi) = pass.index_range(n as u64);
                for (i, &v) in values.iter().enumerate() {
                    if pass.bucket(magnitude_key(v), i as u64).is_some() {
                        assert!(lo <= i as u64 && (i as u64) < hi, "{pass:?} {i} not in {lo}..{hi}");
                    }
                }
                sel.feed_values(0, &values).unwrap();
                sel.finish_pass().unwrap();
            }
        }
        let p = Pass::Index { key: 0, shift: 53, bits: 11, prefix: 0 };
        assert_eq!(p.index_range(u64::MAX), (0, u64::MAX));
        let p = Pass::Index { key: 0, shift: 2, bits: 11, prefix: 3 };
        assert_eq!(p.index_range(100_000), (3 << 13, 4 << 13));
    }

    #[test]
    fn missing_doubled_or_out_of_range_input_is_an_error() {
        let values = [1.0f32, 2.0, 3.0, 4.0];
        let mut sel = RadixSelect::new("w", 4, 2).unwrap();
        sel.feed_values(0, &values[..3]).unwrap();
        assert!(matches!(sel.finish_pass(), Err(Error::LengthMismatch { expected: 4, found: 3, .. })));

        let mut sel = RadixSelect::new("w", 4, 2).unwrap();
        assert!(matches!(sel.feed_values(2, &values[..3]), Err(Error::OutOfRange { value: 5, limit: 4, .. })));

        let mut sel = RadixSelect::new("w", 4, 2).unwrap();
        assert!(matches!(
            sel.feed_values(0, &[1.0, f32::NAN, f32::INFINITY, 0.0]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(matches!(sel.feed_keys(0, &[5, 0x8000_0000]), Err(Error::NonFinite { index: 1, .. })));
        assert!(matches!(RadixSelect::new("w", 4, 5), Err(Error::OutOfRange { .. })));
        assert!(matches!(RadixSelect::new("w", 4, 0), Err(Error::OutOfRange { .. })));
        let mut sel = RadixSelect::new("w", 4, 2).unwrap();
        assert!(matches!(sel.add_histogram(&[0; 7]), Err(Error::LengthMismatch { .. })));
    }

    /// A first pass split over copies and joined with `absorb` gives the oracle's
    /// threshold, with ties (many equal magnitudes) and without; a part copied in
    /// another pass is refused.
    #[test]
    fn a_first_pass_split_over_absorbed_copies_gives_the_same_threshold() {
        let mut rng = SplitMix64::new(9);
        for round in 0..40 {
            let n = 1 + below(&mut rng, 5000) as usize;
            let distinct = if round % 2 == 0 { 7 } else { 1 << 20 };
            let values: Vec<f32> = (0..n).map(|_| below(&mut rng, distinct) as f32 * 0.25 - 1.0).collect();
            let k = 1 + below(&mut rng, n as u64) as usize;
            let mut whole = RadixSelect::new("w", n as u64, k as u64).unwrap();
            let mut parts = Vec::new();
            let mut at = 0;
            while at < n {
                let len = (1 + below(&mut rng, 1500) as usize).min(n - at);
                let mut part = whole.clone();
                part.feed_values(at as u64, &values[at..at + len]).unwrap();
                parts.push(part);
                at += len;
            }
            // Absorbed in reverse: the order does not matter.
            for part in parts.iter().rev() {
                whole.absorb(part).unwrap();
            }
            whole.finish_pass().unwrap();
            let mut candidates = [Candidate::default(); 64];
            let got = whole.finish_in_memory(core::iter::once(&values[..]), &mut candidates).unwrap();
            assert_eq!(got, oracle(&values, k).1, "round {round}, n {n}, k {k}");
        }
        let mut sel = RadixSelect::new("w", 4, 2).unwrap();
        let stale = sel.clone();
        sel.feed_values(0, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        sel.finish_pass().unwrap();
        assert!(matches!(sel.absorb(&stale), Err(Error::Misuse { .. })));
    }

    #[test]
    fn local_thresholds_decide_like_global_ones() {
        let mut rng = SplitMix64::new(6);
        for _ in 0..2000 {
            let t = Threshold { key: below(&mut rng, 8) as u32, cutoff: below(&mut rng, 300) };
            let offset = below(&mut rng, 300);
            let local = t.local(offset);
            for j in 0..40u32 {
                let key = below(&mut rng, 8) as u32;
                assert_eq!(local.keeps(key, j), t.keeps(key, offset + u64::from(j)));
            }
        }
    }

    #[test]
    fn lane_counters_are_emptied_before_they_can_overflow() {
        let values = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let mut sel = RadixSelect::new("t", 5, 2).unwrap();
        sel.feed_values(0, &values[..2]).unwrap();
        // As if 2^32 − 3 elements had been counted since the lanes were emptied:
        // the next chunk must move the counts to the totals first.
        sel.pending = u64::from(u32::MAX) - 2;
        sel.feed_values(2, &values[2..]).unwrap();
        assert_eq!(sel.pending, 3);
        assert_eq!(sel.hist.iter().sum::<u64>(), 2);
        while sel.pass().is_some() {
            if sel.candidates() != 5 {
                sel.feed_values(0, &values).unwrap();
            }
            sel.finish_pass().unwrap();
        }
        assert_eq!(sel.threshold(), Some(Threshold { key: 4.0f32.to_bits(), cutoff: 4 }));
    }

    /// The select over the elements at or above any key that at least `k`
    /// elements reach, gathered in pieces, is the whole scope's, ties included;
    /// too few candidates are refused.
    #[test]
    fn finishing_among_the_elements_above_a_bound_gives_the_whole_threshold() {
        let mut rng = SplitMix64::new(0x005a_3b1e);
        for case in 0..400 {
            let n = 1 + below(&mut rng, if case % 4 == 0 { 3000 } else { 200 }) as usize;
            let values = values_of(&mut rng, n, case % 5);
            let k = 1 + below(&mut rng, n as u64) as usize;
            let mut keys: Vec<u32> = values.iter().map(|&x| magnitude_key(x)).collect();
            keys.sort_unstable_by(|a, b| b.cmp(a));
            // Any key at or below the k-th largest: at least k elements reach it.
            let bound = keys[k - 1 + below(&mut rng, (n - k + 1) as u64) as usize];
            let mut list = std::vec![Candidate::default(); n];
            let mut len = 0;
            let mut at = 0;
            while at < n {
                let piece = (1 + below(&mut rng, 150) as usize).min(n - at);
                len += gather_at_least("t", bound, at as u64, &values[at..at + piece], &mut list[len..]).unwrap().unwrap();
                at += piece;
            }
            assert_eq!(len, keys.iter().filter(|&&key| key >= bound).count(), "case {case}");
            let mut sel = RadixSelect::new("t", n as u64, k as u64).unwrap();
            check(&values, k, sel.finish_among(&mut list[..len]).unwrap());
            if k > 1 {
                let mut sel = RadixSelect::new("t", n as u64, k as u64).unwrap();
                assert!(matches!(sel.finish_among(&mut list[..k - 1]), Err(Error::Misuse { .. })));
            }
        }
        let values = values_of(&mut rng, 64, 1);
        assert_eq!(gather_at_least("t", 0, 0, &values, &mut [Candidate::default(); 63]).unwrap(), None);
        assert!(matches!(gather_at_least("t", 0, 5, &[1.0, f32::NAN], &mut [Candidate::default(); 2]), Err(Error::NonFinite { index: 6, .. })));
    }

    #[test]
    fn a_first_pass_fused_by_the_caller_then_finished_in_memory() {
        // What the optimizer does: feed pass 1 while computing the values, finish it,
        // then let the select run the rest over the stored values.
        let mut rng = SplitMix64::new(7);
        let values = values_of(&mut rng, 5000, 1);
        let mut sel = RadixSelect::new("t", 5000, 321).unwrap();
        for (c, chunk) in values.chunks(64).enumerate() {
            sel.feed_values(64 * c as u64, chunk).unwrap();
        }
        sel.finish_pass().unwrap();
        let mut scratch = std::vec![Candidate::default(); 5000];
        let t = sel.finish_in_memory([values.as_slice()].into_iter(), &mut scratch).unwrap();
        check(&values, 321, t);
        let mut sel = RadixSelect::new("t", 5000, 321).unwrap();
        assert!(matches!(sel.finish_in_memory([&values[..4999]].into_iter(), &mut scratch), Err(Error::LengthMismatch { .. })));
    }

    #[test]
    fn bad_candidates_are_refused() {
        let mut sel = RadixSelect::new("t", 4, 1).unwrap();
        assert!(matches!(
            sel.feed_candidates(&[Candidate { index: 4, key: 1 }]),
            Err(Error::OutOfRange { value: 4, limit: 4, .. })
        ));
        assert!(matches!(
            sel.feed_candidates(&[Candidate { index: 2, key: 0x7f80_0000 }]),
            Err(Error::NonFinite { index: 2, .. })
        ));
        let values = [1.0f32, f32::NAN];
        let mut scratch = [Candidate::default(); 2];
        assert!(matches!(select_with_scratch("t", &[&values], 1, &mut scratch), Err(Error::NonFinite { index: 1, .. })));
    }

    #[test]
    fn empty_scope_keeps_nothing() {
        assert_eq!(select("t", &[], 0).unwrap(), Threshold::NOTHING);
        assert!(!Threshold::NOTHING.keeps(KEY_MAX, 0));
        assert_eq!(keep_count("p", 0.5, 0).unwrap(), 0);
    }

    #[test]
    fn keep_count_is_the_exact_ceiling_of_p_times_n() {
        assert_eq!(keep_count("p", 1.0, 7).unwrap(), 7);
        assert_eq!(keep_count("p", 0.5, 3).unwrap(), 2);
        assert_eq!(keep_count("p", 0.5, 4).unwrap(), 2);
        // 0.1f32 = 0.100000001490116...: 10 · p is just above 1.
        assert_eq!(keep_count("p", 0.1, 10).unwrap(), 2);
        // 0.01f32 = 0.00999999977648...: 100 · p is just below 1.
        assert_eq!(keep_count("p", 0.01, 100).unwrap(), 1);
        assert_eq!(keep_count("p", f32::MIN_POSITIVE, u64::MAX).unwrap(), 1);
        assert_eq!(keep_count("p", 1.0, u64::MAX).unwrap(), u64::MAX);
        let mut rng = SplitMix64::new(5);
        for _ in 0..100_000 {
            // Products below 2^53 are exact in binary64: an independent oracle.
            let p = f32::from_bits(0x0080_0000 + below(&mut rng, 0x3f80_0000 - 0x0080_0000 + 1) as u32);
            let n = below(&mut rng, 1 << 29);
            let want = ((p as f64) * (n as f64)).ceil() as u64;
            let want = if n == 0 { 0 } else { want.clamp(1, n) };
            assert_eq!(keep_count("p", p, n).unwrap(), want, "p={p:e} n={n}");
        }
        for bad in [0.0f32, -0.0, 1.0e-40, -0.5, 1.0000001, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                keep_count("reserve_p", bad, 10),
                Err(Error::InvalidHyperparameter { name: "reserve_p", .. })
            ));
        }
    }
}
