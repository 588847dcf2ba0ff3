//! The model's parallel loops: whole sequences on worker threads with results in
//! sequence order, and per-thread gradients added in a fixed order, so the bits
//! do not depend on the number of threads.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::layers;
use crate::params::ParamSet;

/// Runs `f(0..n)` on up to `threads` workers and returns results in index order.
pub(crate) fn par_map<T: Send>(threads: usize, n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if threads <= 1 || n <= 1 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.min(n))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break out;
                        }
                        out.push((i, f(i)));
                    }
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(out) => {
                    for (i, t) in out {
                        slots[i] = Some(t);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    slots.into_iter().map(|s| s.expect("every index is claimed by exactly one worker")).collect()
}

/// Elements per job of [`zero`] and [`add_and_zero`].
const CHUNK: usize = 1 << 16;

/// Sets every element of `set` to zero, on up to `threads` threads.
pub(super) fn zero(set: &mut ParamSet, threads: usize) {
    let mut chunks: Vec<&mut [f32]> = set.tensors.iter_mut().flat_map(|t| t.data.chunks_mut(CHUNK)).collect();
    in_shares(&mut chunks, threads, |c| c.fill(0.0));
}

/// `grads += parts[0]; grads += parts[1]; …` element by element in that order,
/// leaving every part zero. Threads take disjoint ranges of each tensor, so the
/// bits do not depend on their number.
pub(super) fn add_and_zero(grads: &mut ParamSet, parts: &mut [std::sync::MutexGuard<'_, ParamSet>], threads: usize) {
    let mut jobs: Vec<(&mut [f32], Vec<&mut [f32]>)> = Vec::new();
    let mut part_tensors: Vec<_> = parts.iter_mut().map(|p| p.tensors.iter_mut()).collect();
    for gt in grads.tensors.iter_mut() {
        let mut part_chunks: Vec<_> = part_tensors
            .iter_mut()
            .map(|it| it.next().expect("gradient sets share a layout").data.chunks_mut(CHUNK))
            .collect();
        for g in gt.data.chunks_mut(CHUNK) {
            jobs.push((g, part_chunks.iter_mut().map(|c| c.next().expect("same length")).collect()));
        }
    }
    in_shares(&mut jobs, threads, |(g, ps)| {
        for p in ps.iter_mut() {
            layers::axpy(g, 1.0, p);
            p.fill(0.0);
        }
    });
}

/// `work` on every item, the items cut into up to `threads` contiguous shares
/// that run on threads of their own.
fn in_shares<T: Send>(items: &mut [T], threads: usize, work: impl Fn(&mut T) + Sync) {
    if threads <= 1 {
        items.iter_mut().for_each(work);
        return;
    }
    let per = items.len().div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|s| {
        for share in items.chunks_mut(per) {
            s.spawn(move || share.iter_mut().for_each(work));
        }
    });
}
