//! The decoder's layers, each forward beside its backward, as plain loops over
//! row-major `[rows, cols]` slices (llm.c style). One call handles one sequence;
//! the model runs sequences in parallel, so nothing here spawns threads.
//!
//! Backward functions *accumulate* (`+=`) into parameter gradients and into input
//! gradients, so a residual stream's two consumers can write to the same buffer.

use super::config::RopeScaling;
use super::math::{exp_f32, exp_f64};
use super::simd::{self, Level, Math};

/// Dot product with eight independent partial sums: the fixed lane structure lets
/// the compiler vectorize without reassociating, and gives every row the same
/// rounding whichever loop computes it.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot`] with its eight partial sums in one 256-bit register: the same
/// operations on each lane and the same final tree, so the same bits. The
/// compiler vectorizes [`dot`]'s array of sums as 128-bit halves with shuffles,
/// which held attention to 5–8 GFLOP/s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    debug_assert_eq!(a.len(), b.len());
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    let mut acc = _mm256_setzero_ps();
    for (x, y) in ca.iter().zip(cb) {
        // SAFETY: each chunk holds eight floats.
        let (x, y) = unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr())) };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    let mut l = [0f32; 8];
    // SAFETY: `l` holds eight floats.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
    let mut s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot`], through [`dot_avx`] in the attention copies compiled for AVX2 and
/// AVX-512F (`WIDE`).
#[inline(always)]
fn dot_at<const WIDE: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: only the AVX2 and AVX-512F copies pass WIDE, on CPUs that have them.
        return unsafe { dot_avx(a, b) };
    }
    dot(a, b)
}

/// `y += a * x`
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

// ---------------------------------------------------------------- linear

/// `w` (`[out, in]`, Hugging Face layout) as `[in, out]`, the layout
/// [`linear_forward`] reads.
pub fn transpose(w: &[f32], ic: usize, oc: usize) -> Vec<f32> {
    debug_assert_eq!(w.len(), oc * ic);
    let mut wt = vec![0f32; ic * oc];
    for (o, wr) in w.chunks_exact(ic).enumerate() {
        for (i, &v) in wr.iter().enumerate() {
            wt[i * oc + o] = v;
        }
    }
    wt
}

/// A weight matrix as [`linear_forward`] reads it.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// `[out, in]`, Hugging Face layout: the parameter itself.
    Hf(&'a [f32]),
    /// `[in, out]`, from [`transpose`]: what the baseline level's loop reads.
    Transposed(&'a [f32]),
}

/// `y[t, o] = b[o] + Σ_i x[t, i] w[o, i]`.
///
/// Every output element is summed in the same order whatever the number of
/// rows, `threads`, the vector level or the weight's layout, so a KV-cache step
/// and a full forward agree bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(y: &mut [f32], x: &[f32], w: Weight<'_>, b: Option<&[f32]>, ic: usize, oc: usize, threads: usize) {
    debug_assert_eq!(y.len(), x.len() / ic * oc);
    for yr in y.chunks_exact_mut(oc) {
        match b {
            Some(b) => yr.copy_from_slice(b),
            None => yr.fill(0.0),
        }
    }
    let src = match w {
        Weight::Hf(w) => Src::Cols(w),
        Weight::Transposed(wt) => Src::Rows(wt),
    };
    accumulate_rows(y, oc, src, ic, threads, Coefs::rows(x, ic));
}

/// Gradients of [`linear_forward`]'s input and weight: `dx += dy w`, `dw += dyᵀ x`
/// (the bias has [`bias_backward`]). `dx` is optional: the LM head's input needs
/// it, but a caller that only wants weight gradients does not.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(dx: Option<&mut [f32]>, dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], ic: usize, oc: usize, threads: usize) {
    let rows = x.len() / ic;
    if let Some(dx) = dx {
        accumulate_rows(dx, ic, Src::Rows(w), oc, threads, Coefs::rows(dy, oc));
    }
    accumulate_rows(dw, ic, Src::Rows(x), rows, threads, Coefs::cols(dy, oc));
}

/// Below this many multiply-adds a product is not worth waking a second thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Rows per fused register tile: `2 · TALL` vector accumulators.
const TALL: usize = 8;

/// Where the `src` operand of [`accumulate_rows`] keeps element `(k, c)`.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    /// `[n_src, n]`, row-major: at `k · n + c`.
    Rows(&'a [f32]),
    /// `[n, n_src]`, a matrix read as its transpose: at `c · n_src + k`.
    Cols(&'a [f32]),
}

/// The other operand of [`accumulate_rows`]: `a(r, k)` at `r · row_stride + k ·
/// k_stride`, so a row-major matrix and a transposed read of one are the same
/// kind of value and the register tiles can address it without a call per term.
#[derive(Clone, Copy)]
pub(super) struct Coefs<'a> {
    data: &'a [f32],
    row_stride: usize,
    k_stride: usize,
}

impl<'a> Coefs<'a> {
    /// `[rows, n_src]`, row-major: `a(r, k)` at `r · n_src + k`.
    pub(super) fn rows(data: &'a [f32], n_src: usize) -> Self {
        Self { data, row_stride: n_src, k_stride: 1 }
    }

    /// `[n_src, rows]` read as its transpose: `a(r, k)` at `k · rows + r`.
    pub(super) fn cols(data: &'a [f32], rows: usize) -> Self {
        Self { data, row_stride: 1, k_stride: rows }
    }

    #[inline(always)]
    fn at(&self, r: usize, k: usize) -> f32 {
        self.data[r * self.row_stride + k * self.k_stride]
    }

    /// A block of `m` rows packed by [`pack_coefs`]: `a(j, k)` at `k · m + j`.
    #[inline(always)]
    fn packed(data: &'a [f32], m: usize) -> Self {
        Self { data, row_stride: 1, k_stride: m }
    }

    /// Rows `0 .. rows`, `k < n_src`, checked once here so that a register
    /// tile reads them without a bounds check per term.
    #[inline(always)]
    fn block(&self, rows: usize, n_src: usize) -> CoefBlock<'a> {
        if rows > 0 && n_src > 0 {
            let last = (rows - 1).checked_mul(self.row_stride).zip((n_src - 1).checked_mul(self.k_stride)).and_then(|(r, k)| r.checked_add(k));
            assert!(last.is_some_and(|i| i < self.data.len()), "a coefficient block beyond its matrix");
        }
        CoefBlock { data: self.data, row_stride: self.row_stride, k_stride: self.k_stride, rows, n_src }
    }
}

/// A block of [`Coefs`] whose extent [`Coefs::block`] has checked.
#[derive(Clone, Copy)]
struct CoefBlock<'a> {
    data: &'a [f32],
    row_stride: usize,
    k_stride: usize,
    rows: usize,
    n_src: usize,
}

impl CoefBlock<'_> {
    /// `a(r0 + j, k)`.
    ///
    /// # Safety
    /// `j < rows` and `k < n_src` of the block.
    #[inline(always)]
    unsafe fn at(&self, j: usize, k: usize) -> f32 {
        debug_assert!(j < self.rows && k < self.n_src);
        // SAFETY: `Coefs::block` checked that the block's largest index, at
        // (rows − 1, n_src − 1), is inside `data` without overflow, and the
        // index grows with `j` and `k`, which the caller keeps below those.
        unsafe { *self.data.get_unchecked(j * self.row_stride + k * self.k_stride) }
    }
}

/// `out[r, c] += Σ_k a(r, k) · src(k, c)` for every row `r` of `out`, rows of
/// length `n`, `k < n_src`.
///
/// With `threads > 1` and enough work, the columns are split among threads;
/// every element is still summed in the same order, so the split changes nothing
/// but the time.
fn accumulate_rows(out: &mut [f32], n: usize, src: Src<'_>, n_src: usize, threads: usize, a: Coefs<'_>) {
    accumulate_rows_at(simd::active(), simd::math(), Blocking::CACHES, out, n, src, n_src, threads, a)
}

/// [`accumulate_rows`] with the vector level, the rounding and the blocking given
/// (the tests run every level in both roundings, and blockings small enough to
/// split their small products).
#[allow(clippy::too_many_arguments)]
pub(super) fn accumulate_rows_at(level: Level, math: Math, blocking: Blocking, out: &mut [f32], n: usize, src: Src<'_>, n_src: usize, threads: usize, a: Coefs<'_>) {
    let level = level.min(simd::detected());
    let fused = math == Math::Fused && simd::fuses_at(level);
    let transposed;
    let src = match src {
        // the portable baseline loop streams rows of the source (the fused
        // one, aarch64's, packs panels as the wider levels do)
        Src::Cols(m) if level == Level::Baseline && !fused => {
            transposed = transpose(m, n_src, n);
            Src::Rows(&transposed)
        }
        src => src,
    };
    let rows = out.len() / n;
    // at least 64 columns each, so every thread still has whole vectors to work on
    let parts = if rows * n * n_src >= PARALLEL_MIN_MACS {
        threads.min(n / 64).max(1)
    } else {
        1
    };
    if parts == 1 {
        accumulate_segments(level, fused, blocking, out.chunks_exact_mut(n).collect(), 0, src, n, n_src, a);
        return;
    }
    let width = n.div_ceil(parts);
    let mut split: Vec<Vec<&mut [f32]>> = (0..parts).map(|_| Vec::with_capacity(rows)).collect();
    for row in out.chunks_exact_mut(n) {
        for (p, seg) in row.chunks_mut(width).enumerate() {
            split[p].push(seg);
        }
    }
    std::thread::scope(|s| {
        for (p, segs) in split.into_iter().enumerate() {
            s.spawn(move || accumulate_segments(level, fused, blocking, segs, p * width, src, n, n_src, a));
        }
    });
}

/// The work of [`accumulate_rows`] on `segs[r]` = columns `c0 .. c0 + len` of
/// output row `r`, at `level` (at most what the CPU has; a `Cols` source only
/// above the baseline), `fused` only where [`simd::fuses_at`] the level.
#[allow(clippy::too_many_arguments)]
fn accumulate_segments(level: Level, fused: bool, blocking: Blocking, segs: Vec<&mut [f32]>, c0: usize, src: Src<'_>, n: usize, n_src: usize, a: Coefs<'_>) {
    // SAFETY: a copy runs only on a CPU that has its instructions (FMA checked
    // by `simd::fuses_at` for the fused copies).
    match (level, src) {
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, _) if fused => unsafe { fused_segments_avx512(blocking, segs, c0, src, n, n_src, a) },
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, _) => unsafe { accumulate_segments_avx512(blocking, segs, c0, src, n, n_src, a) },
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, _) if fused => unsafe { fused_segments_avx2(blocking, segs, c0, src, n, n_src, a) },
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, _) => unsafe { accumulate_segments_avx2(blocking, segs, c0, src, n, n_src, a) },
        // NEON, FMA included, is part of every aarch64 CPU
        #[cfg(target_arch = "aarch64")]
        (Level::Baseline, _) if fused => tiled_segments::<8, true>(blocking, segs, c0, src, n, n_src, a),
        (_, Src::Rows(m)) => stream_segments(segs, c0, m, n, n_src, a),
        (_, Src::Cols(_)) => unreachable!("accumulate_rows_at transposes a Cols source for the portable baseline"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn accumulate_segments_avx512(blocking: Blocking, segs: Vec<&mut [f32]>, c0: usize, src: Src<'_>, n: usize, n_src: usize, a: Coefs<'_>) {
    tiled_segments::<32, false>(blocking, segs, c0, src, n, n_src, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn accumulate_segments_avx2(blocking: Blocking, segs: Vec<&mut [f32]>, c0: usize, src: Src<'_>, n: usize, n_src: usize, a: Coefs<'_>) {
    tiled_segments::<16, false>(blocking, segs, c0, src, n, n_src, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fused_segments_avx512(blocking: Blocking, segs: Vec<&mut [f32]>, c0: usize, src: Src<'_>, n: usize, n_src: usize, a: Coefs<'_>) {
    tiled_segments::<32, true>(blocking, segs, c0, src, n, n_src, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fused_segments_avx2(blocking: Blocking, segs: Vec<&mut [f32]>, c0: usize, src: Src<'_>, n: usize, n_src: usize, a: Coefs<'_>) {
    tiled_segments::<16, true>(blocking, segs, c0, src, n, n_src, a)
}

/// How [`tiled_segments`] cuts a product for the caches.
#[derive(Clone, Copy, Debug)]
pub(super) struct Blocking {
    /// Terms per run of the inner dimension, a multiple of 4 (the portable
    /// tile's groups), used when the inner dimension is longer.
    pub(super) k: usize,
    /// Output rows per run.
    pub(super) rows: usize,
    /// Bytes of packed source panels shared by one run of rows.
    pub(super) panel_bytes: usize,
    /// Bytes of packed coefficients: output rows go in chunks (of whole runs)
    /// whose coefficients for one run of the inner dimension fit.
    pub(super) coef_bytes: usize,
}

impl Blocking {
    /// For this machine's caches: a run of rows' coefficients (256 × 256
    /// floats, 256 KiB) and the panels they meet (256 KiB) stay in L2 while
    /// every tile of the group reads them. The packed coefficients (at most
    /// 4 MiB; 512 KiB for 512 tokens and a run of 256 terms) are written once
    /// per run of the inner dimension.
    pub(super) const CACHES: Blocking = Blocking { k: 256, rows: 256, panel_bytes: 256 << 10, coef_bytes: 4 << 20 };
}

/// Output columns go in tiles of `W` (two vector registers per row at each
/// level), four rows at a time ([`TALL`] in fused math, whose tile needs no
/// temporaries): the tile's sums stay in registers through a run of `k`, so
/// each loaded source vector serves every row of the block and no partial sum
/// goes back to memory within the run. Each tile's `[k, W]` source columns are
/// first packed contiguously (from either layout, so weights need no transposed
/// copy), and so are the coefficients of each block of rows, `[k, rows]`: read
/// in place, a block's rows (or, for a transposed read such as a weight
/// gradient's `dyᵀ`, its successive terms) lie a row of the matrix apart, and
/// with rows of 2048 or 32000 floats those addresses share a handful of L1
/// sets and miss on every term (the MLP's up product ran its backward at half
/// its forward's speed, the LM head's at a third). Blocked as in GotoBLAS: for
/// each run of the inner dimension, a group of tiles is packed, and each run of
/// rows goes through the whole group while its coefficients are in cache, so
/// neither operand streams from memory once per tile. A run ends by storing the
/// sums into the output, and the next reloads them: each element still takes
/// its terms one at a time in ascending `k` (four at a time, from multiples of
/// four, in portable math), so the blocking and the packing change no bit. The
/// last tile of a segment may be narrower; its unused lanes compute on zeros
/// and are dropped. `FUSED` runs [`fused_tile`] instead of [`tile`]: same
/// layout, one FMA per term.
#[inline(always)]
fn tiled_segments<const W: usize, const FUSED: bool>(blocking: Blocking, mut segs: Vec<&mut [f32]>, c0: usize, src: Src<'_>, n: usize, n_src: usize, a: Coefs<'_>) {
    let Some(len) = segs.first().map(|s| s.len()) else { return };
    debug_assert!(blocking.k.is_multiple_of(4) && blocking.k > 0 && blocking.rows > 0);
    let rows = segs.len();
    let kc = if n_src > blocking.k { blocking.k } else { n_src.max(1) };
    let tiles = len.div_ceil(W);
    let group = (blocking.panel_bytes / (kc * W * 4)).clamp(1, tiles.max(1));
    let chunk = (blocking.coef_bytes / (kc * 4) / blocking.rows).max(1) * blocking.rows;
    let mut panels = vec![[0f32; W]; group * kc];
    let mut coefs = vec![0f32; chunk.min(rows) * kc];
    for c_r0 in (0..rows).step_by(chunk) {
        let c_end = (c_r0 + chunk).min(rows);
        for k0 in (0..n_src).step_by(kc) {
            let kl = kc.min(n_src - k0);
            for r0 in (c_r0..c_end).step_by(blocking.rows) {
                let run = (r0 + blocking.rows).min(c_end);
                pack_coefs::<FUSED>(&mut coefs[(r0 - c_r0) * kl..(run - c_r0) * kl], a, r0, run - r0, k0, kl);
            }
            for t0 in (0..tiles).step_by(group) {
                let group_tiles = t0..(t0 + group).min(tiles);
                for t in group_tiles.clone() {
                    let col = t * W;
                    pack_panel(&mut panels[(t - t0) * kc..(t - t0) * kc + kl], src, c0 + col, W.min(len - col), n, n_src, k0);
                }
                for r0 in (c_r0..c_end).step_by(blocking.rows) {
                    let run = (r0 + blocking.rows).min(c_end);
                    let packed = &coefs[(r0 - c_r0) * kl..(run - c_r0) * kl];
                    for t in group_tiles.clone() {
                        let col = t * W;
                        tile_rows::<W, FUSED>(&mut segs[r0..run], col, W.min(len - col), &panels[(t - t0) * kc..(t - t0) * kc + kl], packed);
                    }
                }
            }
        }
    }
}

/// Columns `col .. col + width` of `run` (a run of the product's rows) from one
/// packed panel and the run's coefficients packed by [`pack_coefs`], register
/// block by block of [`row_blocks`].
#[inline(always)]
fn tile_rows<const W: usize, const FUSED: bool>(run: &mut [&mut [f32]], col: usize, width: usize, panel: &[[f32; W]], coefs: &[f32]) {
    let kl = panel.len();
    let mut rest = run;
    for (i, m) in row_blocks::<FUSED>(rest.len()) {
        let (block, tail) = rest.split_at_mut(m);
        rest = tail;
        let a = Coefs::packed(&coefs[i * kl..(i + m) * kl], m);
        match (FUSED, m) {
            (true, TALL) => fused_tile::<W, TALL>(block, col, width, panel, a),
            (true, 4) => fused_tile::<W, 4>(block, col, width, panel, a),
            (true, _) => fused_tile::<W, 1>(block, col, width, panel, a),
            (false, 4) => tile::<W, 4>(block, col, width, panel, a),
            (false, _) => tile::<W, 1>(block, col, width, panel, a),
        }
    }
}

/// How [`tile_rows`] cuts a run of `rows` output rows into register blocks:
/// `(first row, rows)` of each, [`TALL`] rows at a time in fused math, then
/// four, then one.
fn row_blocks<const FUSED: bool>(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let tall_rows = if FUSED { rows / TALL * TALL } else { 0 };
    let quad_rows = tall_rows + (rows - tall_rows) / 4 * 4;
    let tall = (0..tall_rows).step_by(TALL).map(|r| (r, TALL));
    let quads = (tall_rows..quad_rows).step_by(4).map(|r| (r, 4));
    tall.chain(quads).chain((quad_rows..rows).map(|r| (r, 1)))
}

/// Packs the coefficients of the `rows` rows from `r0` and the `kl` terms from
/// `k0`, block by block of [`row_blocks`]: the block of `m` rows from run row
/// `i` holds `a(r0 + i + j, k0 + k)` at `i · kl + k · m + j`, the order its
/// tile reads them.
#[inline(always)]
fn pack_coefs<const FUSED: bool>(out: &mut [f32], a: Coefs<'_>, r0: usize, rows: usize, k0: usize, kl: usize) {
    debug_assert_eq!(out.len(), rows * kl);
    for (i, m) in row_blocks::<FUSED>(rows) {
        let block = &mut out[i * kl..(i + m) * kl];
        if a.k_stride == 1 {
            // rows of the matrix: each row's run of terms is contiguous
            for j in 0..m {
                let row = &a.data[(r0 + i + j) * a.row_stride + k0..][..kl];
                for (to, &v) in block[j..].iter_mut().step_by(m).zip(row) {
                    *to = v;
                }
            }
        } else {
            // a transposed read: a term's rows are contiguous
            for (k, to) in block.chunks_exact_mut(m).enumerate() {
                for (j, t) in to.iter_mut().enumerate() {
                    *t = a.at(r0 + i + j, k0 + k);
                }
            }
        }
    }
}

/// `panel[k][i] = src(k0 + k, c + i)` for `i < width`, zeros beyond. From a
/// `Cols` source (a weight in Hugging Face layout) this is a transpose: it
/// goes in 8 × 8 blocks through registers ([`transpose8`]), since element by
/// element the compiler makes it a scatter, which cost 5% of the forward's
/// products.
#[inline(always)]
fn pack_panel<const W: usize>(panel: &mut [[f32; W]], src: Src<'_>, c: usize, width: usize, n: usize, n_src: usize, k0: usize) {
    if width < W {
        panel.iter_mut().for_each(|p| p.fill(0.0));
    }
    match src {
        Src::Rows(m) => {
            for (k, p) in panel.iter_mut().enumerate() {
                let at = (k0 + k) * n + c;
                if width == W {
                    // a copy of a length known at compile time is two vector
                    // moves; of a run-time length, a call to memcpy per row
                    *p = *<&[f32; W]>::try_from(&m[at..at + W]).expect("W floats");
                } else {
                    p[..width].copy_from_slice(&m[at..at + width]);
                }
            }
        }
        Src::Cols(m) => {
            let column = |i: usize| &m[(c + i) * n_src + k0..(c + i + 1) * n_src];
            let (blocked_i, blocked_k) = if cfg!(target_arch = "x86_64") { (width / 8 * 8, panel.len() / 8 * 8) } else { (0, 0) };
            #[cfg(target_arch = "x86_64")]
            for i0 in (0..blocked_i).step_by(8) {
                let columns: [&[f32]; 8] = core::array::from_fn(|j| column(i0 + j));
                for k in (0..blocked_k).step_by(8) {
                    // SAFETY: only the AVX2 and AVX-512F copies of the products
                    // (`accumulate_segments`) reach this, on CPUs that have AVX.
                    unsafe { transpose8(columns.map(|col| &col[k..k + 8]), &mut panel[k..k + 8], i0) };
                }
            }
            for i in 0..width {
                let from = if i < blocked_i { blocked_k } else { 0 };
                for (p, &v) in panel[from..].iter_mut().zip(&column(i)[from..]) {
                    p[i] = v;
                }
            }
        }
    }
}

/// `to[q][i0 + j] = from[j][q]` for `j, q < 8`: an 8 × 8 transpose in eight
/// 256-bit registers.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose8<const W: usize>(from: [&[f32]; 8], to: &mut [[f32; W]], i0: usize) {
    use core::arch::x86_64::*;
    assert!(from.iter().all(|f| f.len() >= 8) && to.len() >= 8 && i0 + 8 <= W);
    // SAFETY: the loads read 8 floats of slices checked to hold them, the
    // stores write 8 floats of rows checked to hold them past `i0`; the
    // caller guarantees AVX.
    unsafe {
        let r: [__m256; 8] = core::array::from_fn(|j| _mm256_loadu_ps(from[j].as_ptr()));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        // s_q: rows 0–3 of column q in the low half, of column q + 4 in the high
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xee>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xee>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xee>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xee>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ];
        for (row, v) in to.iter_mut().zip(out) {
            _mm256_storeu_ps(row[i0..i0 + 8].as_mut_ptr(), v);
        }
    }
}

/// Columns `col .. col + width` of the `M` output rows `block`, given those
/// columns of `src` packed as `panel[k]` and the block's coefficients `a` (as
/// [`pack_coefs`] lays them out): the [`axpy4`] / [`axpy`] sums, held in
/// registers.
#[inline(always)]
fn tile<const W: usize, const M: usize>(block: &mut [&mut [f32]], col: usize, width: usize, panel: &[[f32; W]], a: Coefs<'_>) {
    let mut acc = [[0f32; W]; M];
    for (y, row) in acc.iter_mut().zip(block.iter()) {
        y[..width].copy_from_slice(&row[col..col + width]);
    }
    let n_src = panel.len();
    let a = a.block(M, n_src);
    let x = |k: usize| &panel[k];
    let mut k = 0;
    while k + 4 <= n_src {
        let (x0, x1, x2, x3) = (x(k), x(k + 1), x(k + 2), x(k + 3));
        for (j, y) in acc.iter_mut().enumerate() {
            // SAFETY: j < M and k + 3 < n_src, the block's extent.
            let (a0, a1, a2, a3) = unsafe { (a.at(j, k), a.at(j, k + 1), a.at(j, k + 2), a.at(j, k + 3)) };
            for i in 0..W {
                y[i] += (a0 * x0[i] + a1 * x1[i]) + (a2 * x2[i] + a3 * x3[i]);
            }
        }
        k += 4;
    }
    for k in k..n_src {
        let xk = x(k);
        for (j, y) in acc.iter_mut().enumerate() {
            // SAFETY: j < M and k < n_src, the block's extent.
            let ak = unsafe { a.at(j, k) };
            for i in 0..W {
                y[i] += ak * xk[i];
            }
        }
    }
    for (y, row) in acc.iter().zip(block.iter_mut()) {
        row[col..col + width].copy_from_slice(&y[..width]);
    }
}

/// [`tile`] with each term fused into its sum: `y ← fma(a(r, k), x_k, y)` for
/// `k` ascending, one rounding per term. The accumulators are vector registers
/// named by intrinsics, since the compiler keeps [`tile`]'s arrays in registers
/// but spills the same arrays updated through `mul_add`. `W` = 32 is the
/// AVX-512F copy, 16 the AVX2 + FMA one, each only inlined into the
/// `fused_segments_*` function of its level; `W` = 8 is aarch64's NEON.
#[inline(always)]
fn fused_tile<const W: usize, const M: usize>(block: &mut [&mut [f32]], col: usize, width: usize, panel: &[[f32; W]], a: Coefs<'_>) {
    #[allow(unused_macros)]
    macro_rules! fused {
        ($vec:ty, $half:expr, $zero:expr, $load:ident, $store:ident, $splat:ident, $fmadd:ident) => {{
            let mut acc: [[$vec; 2]; M] = [[$zero; 2]; M];
            let a = a.block(M, panel.len());
            // a full tile is loaded and stored in place; a narrower one
            // through `lanes` (a copy of a length only known at run time is
            // a library call, which per row costs as much as the tile's k loop)
            let mut lanes = [0f32; W];
            for (y, row) in acc.iter_mut().zip(block.iter()) {
                let from = if width == W {
                    row[col..col + W].as_ptr()
                } else {
                    lanes[..width].copy_from_slice(&row[col..col + width]);
                    lanes.as_ptr()
                };
                *y = [$load(from), $load(from.add($half))];
            }
            for (k, x) in panel.iter().enumerate() {
                let (x0, x1) = ($load(x.as_ptr()), $load(x.as_ptr().add($half)));
                for (j, y) in acc.iter_mut().enumerate() {
                    let aj = $splat(a.at(j, k));
                    *y = [$fmadd(aj, x0, y[0]), $fmadd(aj, x1, y[1])];
                }
            }
            for (y, row) in acc.iter().zip(block.iter_mut()) {
                if width == W {
                    let to = row[col..col + W].as_mut_ptr();
                    $store(to, y[0]);
                    $store(to.add($half), y[1]);
                } else {
                    $store(lanes.as_mut_ptr(), y[0]);
                    $store(lanes.as_mut_ptr().add($half), y[1]);
                    row[col..col + width].copy_from_slice(&lanes[..width]);
                }
            }
        }};
    }
    // SAFETY (both architectures): only the functions named above inline
    // this, with the features these intrinsics need (aarch64's are its
    // baseline); every load and store touches W = 2 · half floats of `lanes`,
    // a panel row or a full tile's W columns of an output row (sliced, so
    // bounds-checked); every coefficient read is at j < M, k < panel.len(),
    // the extent `a.block` checked.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use core::arch::x86_64::*;
        match W {
            32 => fused!(__m512, 16, _mm512_setzero_ps(), _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps),
            16 => fused!(__m256, 8, _mm256_setzero_ps(), _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps),
            _ => unreachable!("x86-64's fused tiles are 16 or 32 columns"),
        }
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        use core::arch::aarch64::*;
        // x86's operand order, `a · x + y`; vfmaq_f32 takes the addend first
        #[inline(always)]
        unsafe fn fmadd(a: float32x4_t, x: float32x4_t, y: float32x4_t) -> float32x4_t {
            unsafe { vfmaq_f32(y, a, x) }
        }
        match W {
            8 => fused!(float32x4_t, 4, vdupq_n_f32(0.0), vld1q_f32, vst1q_f32, vdupq_n_f32, fmadd),
            _ => unreachable!("aarch64's fused tiles are 8 columns"),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (block, col, width, panel, a);
        unreachable!("fused products run on x86-64 and aarch64 only (simd::fuses_at)");
    }
}

/// The baseline level's product: source rows four at a time through [`axpy4`]
/// in ascending `k`, output rows in blocks of four so each group of source rows
/// is loaded once per block. With 128-bit vectors the broadcasts of a register
/// tile cost more than the loads it saves (measured with the `linear` bench).
fn stream_segments(mut segs: Vec<&mut [f32]>, c0: usize, src: &[f32], n: usize, n_src: usize, a: Coefs<'_>) {
    let Some(len) = segs.first().map(|s| s.len()) else { return };
    let stile = |k: usize| &src[k * n + c0..k * n + c0 + len];
    for (b, block) in segs.chunks_mut(4).enumerate() {
        let r0 = 4 * b;
        let mut k = 0;
        while k + 4 <= n_src {
            let s = [stile(k), stile(k + 1), stile(k + 2), stile(k + 3)];
            for (j, seg) in block.iter_mut().enumerate() {
                let r = r0 + j;
                axpy4(seg, [a.at(r, k), a.at(r, k + 1), a.at(r, k + 2), a.at(r, k + 3)], s);
            }
            k += 4;
        }
        for k in k..n_src {
            for (j, seg) in block.iter_mut().enumerate() {
                axpy(seg, a.at(r0 + j, k), stile(k));
            }
        }
    }
}

/// `db += Σ_t dy[t, :]`
pub fn bias_backward(db: &mut [f32], dy: &[f32]) {
    for row in dy.chunks_exact(db.len()) {
        axpy(db, 1.0, row);
    }
}

/// `y += ((a0 x0 + a1 x1) + (a2 x2 + a3 x3))`
#[inline(always)]
fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    let n = y.len();
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for i in 0..n {
        y[i] += (a[0] * x0[i] + a[1] * x1[i]) + (a[2] * x2[i] + a[3] * x3[i]);
    }
}

// ---------------------------------------------------------------- embedding

pub fn embedding_forward(x: &mut [f32], tokens: &[u32], table: &[f32], c: usize) {
    for (t, &tok) in tokens.iter().enumerate() {
        let tok = tok as usize;
        x[t * c..(t + 1) * c].copy_from_slice(&table[tok * c..(tok + 1) * c]);
    }
}

pub fn embedding_backward(dtable: &mut [f32], dx: &[f32], tokens: &[u32], c: usize) {
    for (t, &tok) in tokens.iter().enumerate() {
        let tok = tok as usize;
        axpy(&mut dtable[tok * c..(tok + 1) * c], 1.0, &dx[t * c..(t + 1) * c]);
    }
}

// ---------------------------------------------------------------- RMSNorm

/// `y = x / sqrt(mean(x²) + eps) * w` (Hugging Face LlamaRMSNorm); saves `rstd`
/// per row for the backward pass.
pub fn rmsnorm_forward(y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32, c: usize) {
    for (t, r) in rstd.iter_mut().enumerate() {
        let xr = &x[t * c..(t + 1) * c];
        let ms = dot(xr, xr) / c as f32;
        let s = 1.0 / (ms + eps).sqrt();
        *r = s;
        for ((yi, xi), wi) in y[t * c..(t + 1) * c].iter_mut().zip(xr).zip(w) {
            *yi = (xi * s) * wi;
        }
    }
}

/// With `n = x·rstd`: `dw += Σ_t dy ⊙ n`, `dx += rstd (dy⊙w − n · mean(dy⊙w⊙n))`.
pub fn rmsnorm_backward(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], c: usize) {
    for (t, &s) in rstd.iter().enumerate() {
        let xr = &x[t * c..(t + 1) * c];
        let dyr = &dy[t * c..(t + 1) * c];
        let mut m = 0.0f32;
        for i in 0..c {
            let n = xr[i] * s;
            dw[i] += dyr[i] * n;
            m += dyr[i] * w[i] * n;
        }
        m /= c as f32;
        let dxr = &mut dx[t * c..(t + 1) * c];
        for i in 0..c {
            dxr[i] += s * (dyr[i] * w[i] - xr[i] * s * m);
        }
    }
}

// ---------------------------------------------------------------- rotary positions

/// cos/sin of `pos · θ^(−2i/d)` for `i < d/2`, computed in f64 and rounded once.
pub struct Rope {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    /// Tables for positions `pos0 .. pos0 + len`, frequencies scaled by `scaling`.
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling, pos0: usize, len: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| scaling.inv_freq(1.0 / libm::pow(theta, (2 * i) as f64 / head_dim as f64))).collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in pos0..pos0 + len {
            for &inv_freq in &inv_freq {
                let a = p as f64 * inv_freq;
                cos.push(libm::cos(a) as f32);
                sin.push(libm::sin(a) as f32);
            }
        }
        Self { half, cos, sin }
    }
}

/// Rotates every head of `x` (`[T, heads, 2·half]`) in place, Hugging Face
/// `rotate_half` convention: element `i` pairs with `i + half`, not `i + 1`.
pub fn rope_forward(x: &mut [f32], rope: &Rope, heads: usize) {
    let (half, hd) = (rope.half, 2 * rope.half);
    let rows = x.len() / (heads * hd);
    for t in 0..rows {
        let (cs, sn) = (&rope.cos[t * half..(t + 1) * half], &rope.sin[t * half..(t + 1) * half]);
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
            for i in 0..half {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = b * cs[i] + a * sn[i];
            }
        }
    }
}

/// The rotation is orthogonal, so its backward is the inverse rotation, in place.
pub fn rope_backward(dx: &mut [f32], rope: &Rope, heads: usize) {
    let (half, hd) = (rope.half, 2 * rope.half);
    let rows = dx.len() / (heads * hd);
    for t in 0..rows {
        let (cs, sn) = (&rope.cos[t * half..(t + 1) * half], &rope.sin[t * half..(t + 1) * half]);
        for h in 0..heads {
            let v = &mut dx[(t * heads + h) * hd..(t * heads + h + 1) * hd];
            for i in 0..half {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * cs[i] + b * sn[i];
                v[i + half] = b * cs[i] - a * sn[i];
            }
        }
    }
}

// ---------------------------------------------------------------- attention

/// Shapes of one causal grouped-query attention call. Queries are positions
/// `pos0 .. pos0 + tq`; keys and values cover `0 .. pos0 + tq` (a KV cache when
/// `pos0 > 0`). Query head `h` reads key/value head `h / (heads / kv_heads)`.
#[derive(Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub pos0: usize,
    pub tq: usize,
}

impl AttnShape {
    pub fn tk(&self) -> usize {
        self.pos0 + self.tq
    }
}

/// What [`attention_forward`] keeps for [`attention_backward`].
pub enum AttnSaved {
    /// The softmax weights, `[heads, tq, tk]`.
    Probs(Vec<f32>),
    /// Per `(head, query)` row, at `h · tq + t`: the row's largest score and
    /// `1 / Σ exp(score − largest)`. The backward recomputes the row's weights
    /// with the forward's operations on the forward's values, so the result is
    /// the same bits from `O(heads · T)` memory instead of `O(heads · T²)`, for
    /// one more `q·k` per weight.
    RowStats { max: Vec<f32>, inv_sum: Vec<f32> },
}

impl AttnSaved {
    pub fn probs(s: AttnShape) -> Self {
        AttnSaved::Probs(vec![0f32; s.heads * s.tq * s.tk()])
    }

    pub fn row_stats(s: AttnShape) -> Self {
        AttnSaved::RowStats { max: vec![0f32; s.heads * s.tq], inv_sum: vec![0f32; s.heads * s.tq] }
    }
}

/// `out[t, h] = Σ_{j ≤ pos0+t} softmax_j(q[t,h]·k[j,g] / √d) v[j,g]`.
/// With `saved`, what the backward needs is kept there ([`AttnSaved`]).
pub fn attention_forward(out: &mut [f32], saved: Option<&mut AttnSaved>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_forward_at(simd::active(), out, saved, q, k, v, s)
}

/// [`attention_forward`] with the vector level given (the tests run every level).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_forward_at(level: Level, out: &mut [f32], saved: Option<&mut AttnSaved>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    // SAFETY: a copy runs only on a CPU that has its instructions.
    match level.min(simd::detected()) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { attention_forward_avx512(out, saved, q, k, v, s) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { attention_forward_avx2(out, saved, q, k, v, s) },
        _ => attention_forward_body::<false, 1>(out, saved, q, k, v, s),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attention_forward_avx512(out: &mut [f32], saved: Option<&mut AttnSaved>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_forward_body::<true, 16>(out, saved, q, k, v, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attention_forward_avx2(out: &mut [f32], saved: Option<&mut AttnSaved>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_forward_body::<true, 8>(out, saved, q, k, v, s)
}

/// The forward, in the order SPEC §10 fixes. `KB > 1` (the vector levels)
/// scores the keys `KB` at a time ([`dots_blocked`]) and holds the output row
/// in registers across the keys ([`add_weighted_rows`]): the same operations on
/// each value in the same order as the baseline's loops, so the same bits.
#[inline(always)]
fn attention_forward_body<const WIDE: bool, const KB: usize>(out: &mut [f32], mut saved: Option<&mut AttnSaved>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    let (nh, nkv, hd, tk) = (s.heads, s.kv_heads, s.head_dim, s.tk());
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let blocked = KB > 1 && s.tq >= KB;
    // a cache step (one query) would transpose every key to read it once
    let kt = if blocked { key_panels::<KB>(k, nkv, hd, tk) } else { Vec::new() };
    let panel_len = tk / KB.max(1) * KB * hd;
    let mut w = vec![0f32; tk];
    // head by head, so that one head's keys and values stay in cache across
    // its queries (position by position, every head's would pass through it)
    for h in 0..nh {
        let g = h / group;
        let starts = head_row_starts(tk, nkv, g, hd);
        for t in 0..s.tq {
            let visible = s.pos0 + t + 1;
            let qv = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
            let scores = &mut w[..visible];
            let done = if blocked { dots_blocked::<KB>(scores, qv, &kt[g * panel_len..(g + 1) * panel_len]) } else { 0 };
            for (j, sc) in scores.iter_mut().enumerate().skip(done) {
                *sc = dot_at::<WIDE>(qv, &k[(j * nkv + g) * hd..(j * nkv + g + 1) * hd]);
            }
            let mut mx = f32::NEG_INFINITY;
            for sc in scores.iter_mut() {
                *sc *= scale;
                mx = mx.max(*sc);
            }
            for wj in scores.iter_mut() {
                *wj = exp_f32(*wj - mx);
            }
            // Apart from the exponentials, which vectorize: a sum in index order.
            let mut sum = 0f32;
            for &wj in scores.iter() {
                sum += wj;
            }
            let inv = 1.0 / sum;
            for wj in scores.iter_mut() {
                *wj *= inv;
            }
            let o = &mut out[(t * nh + h) * hd..(t * nh + h + 1) * hd];
            o.fill(0.0);
            add_weighted_rows::<KB, false>(o, scores, v, &starts[..visible]);
            match saved.as_deref_mut() {
                Some(AttnSaved::Probs(p)) => {
                    let row = &mut p[(h * s.tq + t) * tk..(h * s.tq + t + 1) * tk];
                    row[..visible].copy_from_slice(scores);
                    row[visible..].fill(0.0);
                }
                Some(AttnSaved::RowStats { max, inv_sum }) => {
                    max[h * s.tq + t] = mx;
                    inv_sum[h * s.tq + t] = inv;
                }
                None => {}
            }
        }
    }
}

/// `x` (`[positions, heads, hd]`, keys or values) as panels for
/// [`dots_blocked`]: per head, per whole block of `KB` positions, `[hd, KB]`,
/// so a block's dimension `i` is one vector and a block is read in order.
fn key_panels<const KB: usize>(x: &[f32], heads: usize, hd: usize, positions: usize) -> Vec<f32> {
    let blocks = positions / KB;
    let mut out = vec![0f32; heads * blocks * hd * KB];
    for (j, row) in x.chunks_exact(heads * hd).take(blocks * KB).enumerate() {
        for (g, head) in row.chunks_exact(hd).enumerate() {
            let panel = ((g * blocks + j / KB) * hd) * KB + j % KB;
            for (i, &val) in head.iter().enumerate() {
                out[panel + i * KB] = val;
            }
        }
    }
    out
}

/// `dots[j] = dot(a, x_j)` for the rows `x_j` of the whole blocks in `panels`
/// (one head's, from [`key_panels`]) that `dots` covers, at the vector level
/// `LANES` names (16: AVX-512F, 8: AVX2; anything else computes none); returns
/// how many it computed.
#[inline(always)]
fn dots_blocked<const LANES: usize>(dots: &mut [f32], a: &[f32], panels: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only the AVX-512F copies pass 16 and only the AVX2 copies pass 8,
    // and a copy runs only on a CPU that has its instructions.
    unsafe {
        if LANES == 16 {
            return avx512_attention::dots_blocked(dots, a, panels);
        }
        if LANES == 8 {
            return avx2_attention::dots_blocked(dots, a, panels);
        }
    }
    let _ = (dots, a, panels);
    0
}

/// `o ← o + w_j x_j` for ascending `j` ([`axpy`]'s operations and order), row
/// `x_j` being `rows[starts[j]..][..o.len()]`; `SKIP_ZERO` leaves out the terms
/// whose weight is zero. At the vector levels (`LANES` as in [`dots_blocked`])
/// `o` stays in registers across the rows.
#[inline(always)]
fn add_weighted_rows<const LANES: usize, const SKIP_ZERO: bool>(o: &mut [f32], w: &[f32], rows: &[f32], starts: &[usize]) {
    debug_assert_eq!(w.len(), starts.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `dots_blocked`.
    unsafe {
        if LANES == 16 {
            return avx512_attention::add_weighted_rows::<SKIP_ZERO>(o, w, rows, starts);
        }
        if LANES == 8 {
            return avx2_attention::add_weighted_rows::<SKIP_ZERO>(o, w, rows, starts);
        }
    }
    let hd = o.len();
    for (&wj, &at) in w.iter().zip(starts) {
        if !(SKIP_ZERO && wj == 0.0) {
            axpy(o, wj, &rows[at..at + hd]);
        }
    }
}

/// Where each position's row of key/value head `g` starts in `[positions,
/// kv_heads, hd]` keys or values.
fn head_row_starts(positions: usize, kv_heads: usize, g: usize, hd: usize) -> Vec<usize> {
    (0..positions).map(|j| (j * kv_heads + g) * hd).collect()
}

/// Attention's blocked loops for one vector instruction set, whose vectors hold
/// `LANES` binary32 values: in [`dots_blocked`] a vector is `LANES` keys and
/// [`dot`]'s eight running sums are eight vectors, so each lane runs `dot`'s
/// chain; in [`add_weighted_rows`] a vector is `LANES` dimensions of the output
/// row, which stays in registers across the rows. Separate multiplies and adds,
/// as everywhere in the model outside the fused products.
#[cfg(target_arch = "x86_64")]
macro_rules! attention_kernels {
    ($module:ident, $feature:literal, $lanes:literal, $zero:ident, $splat:ident, $load:ident, $store:ident, $add:ident, $mul:ident) => {
        mod $module {
            use core::arch::x86_64::*;

            const LANES: usize = $lanes;

            #[target_feature(enable = $feature)]
            pub(super) fn dots_blocked(dots: &mut [f32], a: &[f32], panels: &[f32]) -> usize {
                let hd = a.len();
                let whole = hd / 8 * 8;
                let panel = hd * LANES;
                if panel == 0 {
                    return 0;
                }
                let n = (dots.len() / LANES).min(panels.len() / panel) * LANES;
                let mut sums = [0f32; LANES];
                for (block, x) in panels[..n * hd].chunks_exact(panel).enumerate() {
                    // SAFETY: dimension i < hd reads x[i · LANES..][..LANES],
                    // inside the panel of hd · LANES values.
                    unsafe {
                        let mut acc = [$zero(); 8];
                        for (c, a8) in a[..whole].chunks_exact(8).enumerate() {
                            for (l, (sum, &y)) in acc.iter_mut().zip(a8).enumerate() {
                                let v = $load(x.as_ptr().add((8 * c + l) * LANES));
                                *sum = $add(*sum, $mul($splat(y), v));
                            }
                        }
                        let tree = $add($add($add(acc[0], acc[4]), $add(acc[1], acc[5])), $add($add(acc[2], acc[6]), $add(acc[3], acc[7])));
                        $store(sums.as_mut_ptr(), tree);
                    }
                    for (lane, (dot, &s)) in dots[block * LANES..(block + 1) * LANES].iter_mut().zip(&sums).enumerate() {
                        let mut d = s;
                        for (i, &y) in a.iter().enumerate().skip(whole) {
                            d += y * x[i * LANES + lane];
                        }
                        *dot = d;
                    }
                }
                n
            }

            #[target_feature(enable = $feature)]
            pub(super) fn add_weighted_rows<const SKIP_ZERO: bool>(o: &mut [f32], w: &[f32], rows: &[f32], starts: &[usize]) {
                let hd = o.len();
                let w = &w[..starts.len()];
                assert!(starts.iter().all(|&at| at + hd <= rows.len()), "weighted rows out of range");
                let mut d = 0;
                // SAFETY: every row's dimensions d .. d + width <= hd lie inside
                // rows (asserted), and o's inside o.
                unsafe {
                    while d + 4 * LANES <= hd {
                        let at = o.as_mut_ptr().add(d);
                        let mut acc = [$load(at), $load(at.add(LANES)), $load(at.add(2 * LANES)), $load(at.add(3 * LANES))];
                        for (&wj, &start) in w.iter().zip(starts) {
                            if SKIP_ZERO && wj == 0.0 {
                                continue;
                            }
                            let x = $splat(wj);
                            let row = rows.as_ptr().add(start + d);
                            for (r, sum) in acc.iter_mut().enumerate() {
                                *sum = $add(*sum, $mul(x, $load(row.add(r * LANES))));
                            }
                        }
                        for (r, sum) in acc.into_iter().enumerate() {
                            $store(at.add(r * LANES), sum);
                        }
                        d += 4 * LANES;
                    }
                    while d + LANES <= hd {
                        let at = o.as_mut_ptr().add(d);
                        let mut sum = $load(at);
                        for (&wj, &start) in w.iter().zip(starts) {
                            if !(SKIP_ZERO && wj == 0.0) {
                                sum = $add(sum, $mul($splat(wj), $load(rows.as_ptr().add(start + d))));
                            }
                        }
                        $store(at, sum);
                        d += LANES;
                    }
                }
                for (i, y) in o.iter_mut().enumerate().skip(d) {
                    for (&wj, &start) in w.iter().zip(starts) {
                        if !(SKIP_ZERO && wj == 0.0) {
                            *y += wj * rows[start + i];
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
attention_kernels!(avx512_attention, "avx512f", 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, _mm512_mul_ps);
#[cfg(target_arch = "x86_64")]
attention_kernels!(avx2_attention, "avx2", 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_mul_ps);

/// Backward of [`attention_forward`] with `pos0 = 0` (training never uses a cache):
/// `dv += pᵀ dout`, `ds = p ⊙ (dp − Σ p dp)`, `dq += ds k / √d`, `dk += dsᵀ q / √d`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], saved: &AttnSaved, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_backward_at(simd::active(), dq, dk, dv, dout, saved, q, k, v, s)
}

/// [`attention_backward`] with the vector level given (the tests run every level).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward_at(level: Level, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], saved: &AttnSaved, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    // SAFETY: a copy runs only on a CPU that has its instructions.
    match level.min(simd::detected()) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { attention_backward_avx512(dq, dk, dv, dout, saved, q, k, v, s) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { attention_backward_avx2(dq, dk, dv, dout, saved, q, k, v, s) },
        _ => attention_backward_body::<false, 1>(dq, dk, dv, dout, saved, q, k, v, s),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn attention_backward_avx512(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], saved: &AttnSaved, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_backward_body::<true, 16>(dq, dk, dv, dout, saved, q, k, v, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
fn attention_backward_avx2(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], saved: &AttnSaved, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_backward_body::<true, 8>(dq, dk, dv, dout, saved, q, k, v, s)
}

/// Query rows per tile of the backward.
const BACKWARD_TILE: usize = 32;

/// The backward, in tiles of [`BACKWARD_TILE`] query positions (times the
/// group's heads). For each tile: every row's weights `p`, `dp = dout·v_j`,
/// `ds` and its `dq` (held in registers across the keys), with `p` and `ds`
/// kept by key; then for each key, `dv_j` and `dk_j` take the tile's terms in
/// the tile's row order, held in registers. Each `dv_j`, `dk_j` thus sums its
/// terms in the untiled order (position, then head, ascending): the same bits,
/// with the keys' gradients read and written once per tile instead of once per
/// query row. `KB > 1` blocks the dot products as the forward does.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_backward_body<const WIDE: bool, const KB: usize>(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], dout: &[f32], saved: &AttnSaved, q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    debug_assert_eq!(s.pos0, 0);
    let (nh, nkv, hd, tk) = (s.heads, s.kv_heads, s.head_dim, s.tk());
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let blocked = KB > 1 && s.tq >= KB;
    let kt = if blocked && matches!(saved, AttnSaved::RowStats { .. }) { key_panels::<KB>(k, nkv, hd, tk) } else { Vec::new() };
    let vt = if blocked { key_panels::<KB>(v, nkv, hd, tk) } else { Vec::new() };
    let panel_len = tk / KB.max(1) * KB * hd;
    let tile = BACKWARD_TILE * group;
    // by key j: the tile's rows' p and ds at `j · tile + row`
    let mut p_by_key = vec![0f32; tk * tile];
    let mut ds_by_key = vec![0f32; tk * tile];
    let mut row_p = vec![0f32; tk];
    let mut row_ds = vec![0f32; tk];
    // key/value head by key/value head, so that its keys, values and their
    // gradients stay in cache across the queries
    for g in 0..nkv {
        let heads = g * panel_len..(g + 1) * panel_len;
        let kv_starts = head_row_starts(tk, nkv, g, hd);
        for t0 in (0..s.tq).step_by(BACKWARD_TILE) {
            let t1 = (t0 + BACKWARD_TILE).min(s.tq);
            // the tile's rows (position, then head) and where they start in q and dout
            let q_starts: Vec<usize> = (t0..t1).flat_map(|t| (g * group..(g + 1) * group).map(move |h| (t * nh + h) * hd)).collect();
            for (r, &qi) in q_starts.iter().enumerate() {
                let (t, h) = (t0 + r / group, g * group + r % group);
                let visible = t + 1;
                let qr = &q[qi..qi + hd];
                let p: &[f32] = match saved {
                    AttnSaved::Probs(probs) => &probs[(h * s.tq + t) * tk..(h * s.tq + t) * tk + visible],
                    AttnSaved::RowStats { max, inv_sum } => {
                        // the forward's operations on the forward's values: the same bits
                        let (mx, inv) = (max[h * s.tq + t], inv_sum[h * s.tq + t]);
                        let row = &mut row_p[..visible];
                        let done = if blocked { dots_blocked::<KB>(row, qr, &kt[heads.clone()]) } else { 0 };
                        for (j, pj) in row.iter_mut().enumerate().skip(done) {
                            *pj = dot_at::<WIDE>(qr, &k[kv_starts[j]..kv_starts[j] + hd]);
                        }
                        for pj in row.iter_mut() {
                            *pj = exp_f32(*pj * scale - mx) * inv;
                        }
                        row
                    }
                };
                let dor = &dout[qi..qi + hd];
                let ds = &mut row_ds[..visible];
                let done = if blocked { dots_blocked::<KB>(ds, dor, &vt[heads.clone()]) } else { 0 };
                for (j, d) in ds.iter_mut().enumerate().skip(done) {
                    *d = dot_at::<WIDE>(dor, &v[kv_starts[j]..kv_starts[j] + hd]);
                }
                let mut pdp = 0f32;
                for (&pj, &dpj) in p.iter().zip(ds.iter()) {
                    pdp += pj * dpj;
                }
                for (j, (d, &pj)) in ds.iter_mut().zip(p).enumerate() {
                    *d = pj * (*d - pdp) * scale;
                    p_by_key[j * tile + r] = pj;
                    ds_by_key[j * tile + r] = *d;
                }
                add_weighted_rows::<KB, true>(&mut dq[qi..qi + hd], ds, k, &kv_starts[..visible]);
            }
            // key j is visible to the tile's rows from position max(j, t0) on
            for (j, &at) in kv_starts[..t1].iter().enumerate() {
                let first = j.saturating_sub(t0) * group;
                let rows = j * tile + first..j * tile + q_starts.len();
                add_weighted_rows::<KB, false>(&mut dv[at..at + hd], &p_by_key[rows.clone()], dout, &q_starts[first..]);
                add_weighted_rows::<KB, true>(&mut dk[at..at + hd], &ds_by_key[rows], q, &q_starts[first..]);
            }
        }
    }
}

// ---------------------------------------------------------------- SwiGLU

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// A function's copies for each vector level (its body `#[inline(always)]`, so
/// each copy compiles it with the level's instructions) and the dispatch to the
/// widest the CPU has: `$name` at the active level, `$at` at a given one (the
/// tests run every level and compare bits). For loops whose bits do not depend
/// on the vector width, as [`simd`] says; here the exponentials of
/// [`super::math`] are what vectorizes.
macro_rules! at_every_level {
    ($(#[$doc:meta])* $name:ident, $at:ident, $body:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            $at(simd::active(), $($arg),*)
        }

        pub(super) fn $at(level: Level, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                $body($($arg),*)
            }
            // SAFETY: a copy runs only on a CPU that has its instructions.
            match level.min(simd::detected()) {
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => $body($($arg),*),
            }
        }
    };
}

at_every_level!(
    /// `h = silu(gate) ⊙ up`, `silu(g) = g·σ(g)`.
    swiglu_forward, swiglu_forward_at, swiglu_forward_body, (h: &mut [f32], gate: &[f32], up: &[f32])
);

#[inline(always)]
fn swiglu_forward_body(h: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((hi, &g), &u) in h.iter_mut().zip(gate).zip(up) {
        *hi = g * sigmoid(g) * u;
    }
}

at_every_level!(
    /// `dup = dh ⊙ silu(g)`, `dgate = dh ⊙ up ⊙ σ(g)(1 + g(1 − σ(g)))`; overwrites.
    swiglu_backward, swiglu_backward_at, swiglu_backward_body, (dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32])
);

#[inline(always)]
fn swiglu_backward_body(dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32]) {
    for i in 0..dh.len() {
        let (g, u) = (gate[i], up[i]);
        let sg = sigmoid(g);
        dup[i] = dh[i] * g * sg;
        dgate[i] = dh[i] * u * sg * (1.0 + g * (1.0 - sg));
    }
}

// ---------------------------------------------------------------- log-softmax head

at_every_level!(
    /// Log-softmax of one row of logits, in place into `probs` as probabilities;
    /// returns `log p(target)`. Sums run in f64: vocabularies are large and the
    /// result feeds DPO margins that are differences of nearly equal numbers.
    log_softmax_row, log_softmax_row_at, log_softmax_row_body, (logits: &[f32], target: usize, probs: &mut [f32]) -> f32
);

#[inline(always)]
fn log_softmax_row_body(logits: &[f32], target: usize, probs: &mut [f32]) -> f32 {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f64;
    // The exponentials a run at a time, where they vectorize; the sum in index order.
    let mut exps = [0f64; 64];
    for (ps, ls) in probs.chunks_mut(exps.len()).zip(logits.chunks(exps.len())) {
        let part = &mut exps[..ls.len()];
        for (e, &l) in part.iter_mut().zip(ls) {
            *e = exp_f64((l - mx) as f64);
        }
        for (p, &e) in ps.iter_mut().zip(part.iter()) {
            *p = e as f32;
            sum += e;
        }
    }
    let inv = 1.0 / sum;
    for p in probs.iter_mut() {
        *p = (*p as f64 * inv) as f32;
    }
    ((logits[target] - mx) as f64 - libm::log(sum)) as f32
}

/// `d logits = coef · (onehot(target) − p)`: the gradient of `coef · log p(target)`.
pub fn log_softmax_backward(dlogits: &mut [f32], probs: &[f32], target: usize, coef: f32) {
    for (d, &p) in dlogits.iter_mut().zip(probs) {
        *d = -coef * p;
    }
    dlogits[target] += coef;
}
