//! The fixed tree sum of SPEC.md §3, streamed with a fixed stack (no allocation).
//!
//! `tree_sum` is the perfect binary tree over `2^⌈log2 n⌉` leaves padded with `+0`.
//! Padding never changes a partial sum (`x ⊕ +0 = x` for every flushed `x`), so a
//! stream only has to combine the complete subtrees it holds, from the smallest up.

use crate::arith::{add, flush};

/// Leaves in one aligned block that [`TreeSum::push_slice`] sums without the stack.
const BLOCK: usize = 64;
const BLOCK_LEVEL: u32 = BLOCK.trailing_zeros();

/// A streaming `tree_sum`: feed the leaves in index order, in chunks of any size.
#[derive(Clone, Debug)]
pub struct TreeSum {
    /// `partial[l]` holds the sum of a complete subtree of `2^l` leaves when bit `l`
    /// of `count` is set.
    partial: [f32; 64],
    count: u64,
}

impl Default for TreeSum {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeSum {
    pub const fn new() -> Self {
        TreeSum { partial: [0.0; 64], count: 0 }
    }

    /// Leaves fed so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds the sum of a complete subtree of `2^level` leaves; `count` must be a
    /// multiple of `2^level`.
    #[inline]
    fn push_subtree(&mut self, sum: f32, level: u32) {
        let mut carry = sum;
        let mut l = level;
        while self.count & (1u64 << l) != 0 {
            carry = add(self.partial[l as usize], carry);
            l += 1;
        }
        self.partial[l as usize] = carry;
        self.count += 1u64 << level;
    }

    /// Feeds one leaf (flushed first, as every loaded value is).
    #[inline]
    pub fn push(&mut self, x: f32) {
        self.push_subtree(flush(x), 0);
    }

    /// Feeds consecutive leaves; aligned blocks of 64 are summed as subtrees in a
    /// fixed pairwise order (the same tree, so the same bits as leaf by leaf).
    pub fn push_slice(&mut self, xs: &[f32]) {
        let mut rest = xs;
        while !rest.is_empty() {
            let aligned = self.count.is_multiple_of(BLOCK as u64);
            if aligned && rest.len() >= BLOCK {
                let (block, tail) = rest.split_at(BLOCK);
                self.push_subtree(block_sum(block), BLOCK_LEVEL);
                rest = tail;
            } else {
                self.push(rest[0]);
                rest = &rest[1..];
            }
        }
    }

    /// Feeds `|x|` (sign bit cleared) for every `x`: the L1 norm of SPEC.md §3.2.
    pub fn push_abs_slice(&mut self, xs: &[f32]) {
        let mut buf = [0.0f32; BLOCK];
        for chunk in xs.chunks(BLOCK) {
            for (b, &x) in buf.iter_mut().zip(chunk) {
                *b = f32::from_bits(x.to_bits() & 0x7fff_ffff);
            }
            self.push_slice(&buf[..chunk.len()]);
        }
    }

    /// Feeds the sum of a complete subtree of `2^level` leaves computed elsewhere
    /// (a block of consecutive leaves starting at a multiple of `2^level`, summed
    /// with its own `TreeSum`): how shards of a tensor held by different
    /// processes join into the one tree. `false` (and nothing changed) when the
    /// leaves so far do not end at a multiple of `2^level`.
    pub fn push_block(&mut self, sum: f32, level: u32) -> bool {
        if level >= 64 || !self.count.is_multiple_of(1u64 << level) {
            return false;
        }
        self.push_subtree(flush(sum), level);
        true
    }

    /// Feeds everything `later` was fed, as if its leaves had followed these: its
    /// complete subtrees go in from the largest down. Valid when the leaves so far
    /// fill whole subtrees of `later`'s largest size (a chunk that starts at a
    /// multiple of a power of two no smaller than itself), which is how chunks
    /// summed on different threads join into the one tree; `false` (and nothing
    /// changed) otherwise.
    pub fn append(&mut self, later: &TreeSum) -> bool {
        if later.count == 0 {
            return true;
        }
        let top = 63 - later.count.leading_zeros();
        if !self.count.is_multiple_of(1u64 << top) {
            return false;
        }
        for l in (0..=top).rev() {
            if later.count & (1u64 << l) != 0 {
                self.push_subtree(later.partial[l as usize], l);
            }
        }
        true
    }

    /// The tree sum of everything fed (`+0` if nothing was).
    pub fn finish(&self) -> f32 {
        let mut acc: Option<f32> = None;
        for l in 0..64 {
            if self.count & (1u64 << l) != 0 {
                acc = Some(match acc {
                    None => self.partial[l],
                    Some(right) => add(self.partial[l], right),
                });
            }
        }
        acc.unwrap_or(0.0)
    }
}

/// The tree sum of exactly `BLOCK` leaves, level by level.
#[inline]
fn block_sum(block: &[f32]) -> f32 {
    let mut level = [0.0f32; BLOCK];
    for (l, &x) in level.iter_mut().zip(block) {
        *l = flush(x);
    }
    let mut width = BLOCK;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            level[j] = add(level[2 * j], level[2 * j + 1]);
        }
    }
    level[0]
}

/// `tree_sum` of a whole slice.
pub fn tree_sum(xs: &[f32]) -> f32 {
    let mut t = TreeSum::new();
    t.push_slice(xs);
    t.finish()
}

/// SPEC.md §3.2: `‖x‖₁`.
pub fn l1_norm(xs: &[f32]) -> f32 {
    let mut t = TreeSum::new();
    t.push_abs_slice(xs);
    t.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::testutil::wide_f32;

    /// The definition, literally: pad to a power of two, reduce level by level.
    fn tree_sum_by_definition(xs: &[f32]) -> f32 {
        let mut n = 1;
        while n < xs.len() {
            n *= 2;
        }
        let mut level = [0.0f32; 1024];
        for (l, &x) in level.iter_mut().zip(xs) {
            *l = flush(x);
        }
        while n > 1 {
            n /= 2;
            for j in 0..n {
                level[j] = add(level[2 * j], level[2 * j + 1]);
            }
        }
        level[0]
    }

    #[test]
    fn streaming_equals_the_definition_for_every_length_and_cut() {
        let mut rng = SplitMix64::new(7);
        let mut xs = [0.0f32; 1000];
        for x in xs.iter_mut() {
            *x = wide_f32(&mut rng);
        }
        for n in [0usize, 1, 2, 3, 63, 64, 65, 127, 128, 129, 300, 1000] {
            let want = tree_sum_by_definition(&xs[..n]);
            assert_eq!(tree_sum(&xs[..n]).to_bits(), want.to_bits(), "n={n}");
            // Random cut points.
            for _ in 0..20 {
                let mut t = TreeSum::new();
                let mut at = 0;
                while at < n {
                    let len = 1 + (rng.next_u32() as usize % 97).min(n - at - 1);
                    t.push_slice(&xs[at..at + len]);
                    at += len;
                }
                assert_eq!(t.finish().to_bits(), want.to_bits(), "n={n}");
                assert_eq!(t.len(), n as u64);
            }
        }
    }

    #[test]
    fn chunks_summed_apart_append_to_the_same_tree() {
        let mut rng = SplitMix64::new(11);
        let mut xs = [0.0f32; 1000];
        for x in xs.iter_mut() {
            *x = wide_f32(&mut rng);
        }
        for chunk in [1usize, 2, 64, 128, 256] {
            for n in [0usize, 1, 255, 256, 257, 1000] {
                let mut joined = TreeSum::new();
                for part in xs[..n].chunks(chunk) {
                    let mut t = TreeSum::new();
                    t.push_slice(part);
                    assert!(joined.append(&t));
                }
                assert_eq!(joined.finish().to_bits(), tree_sum(&xs[..n]).to_bits(), "chunk={chunk} n={n}");
                assert_eq!(joined.len(), n as u64);
            }
        }
        // Three leaves, then a chunk of two: not aligned, refused and unchanged.
        let (mut a, mut b) = (TreeSum::new(), TreeSum::new());
        a.push_slice(&xs[..3]);
        b.push_slice(&xs[3..5]);
        assert!(!a.append(&b));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn aligned_blocks_summed_apart_push_into_the_same_tree() {
        let mut rng = SplitMix64::new(12);
        let mut xs = [0.0f32; 1000];
        for x in xs.iter_mut() {
            *x = wide_f32(&mut rng);
        }
        // Cut [0, n) at arbitrary points, then each piece into maximal aligned blocks.
        for cuts in [[0usize, 1000, 1000], [0, 333, 1000], [0, 7, 513]] {
            let mut joined = TreeSum::new();
            let n = cuts[2];
            let mut at = 0;
            while at < n {
                let end = if at < cuts[1] { cuts[1] } else { n };
                let mut level = 0;
                while at % (1 << (level + 1)) == 0 && at + (1 << (level + 1)) <= end {
                    level += 1;
                }
                let block = tree_sum(&xs[at..at + (1 << level)]);
                assert!(joined.push_block(block, level));
                at += 1 << level;
            }
            assert_eq!(joined.finish().to_bits(), tree_sum(&xs[..n]).to_bits(), "{cuts:?}");
        }
        let mut three = TreeSum::new();
        three.push_slice(&xs[..3]);
        assert!(!three.push_block(1.0, 1));
    }

    #[test]
    fn the_tree_shape_is_visible_in_the_rounding() {
        // (1 ⊕ e) ⊕ (e ⊕ e) = 1 + 2^-23, while left to right every e is lost.
        let e = f32::from_bits(0x3380_0000); // 2^-24
        let xs = [1.0, e, e, e];
        let left_to_right = add(add(add(1.0, e), e), e);
        assert_eq!(left_to_right, 1.0);
        assert_eq!(tree_sum(&xs).to_bits(), (1.0f32 + 2.0 * e).to_bits());
    }

    #[test]
    fn l1_clears_signs_and_flushes() {
        let sub = f32::from_bits(1);
        assert_eq!(l1_norm(&[-1.0, 2.0, -0.0, sub, -3.0]).to_bits(), 6.0f32.to_bits());
        assert_eq!(l1_norm(&[]).to_bits(), 0);
        assert_eq!(tree_sum(&[-0.0]).to_bits(), 0);
    }
}
