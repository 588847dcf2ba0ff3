//! The order in which training examples are visited: a fresh permutation per epoch,
//! a pure function of (seed, epoch), so that the examples of global position `pos`
//! are the same in an uninterrupted run and in a resumed one.

// SplitMix64: a small, fully specified generator; data order needs
// reproducibility, not cryptographic quality.
use crate::data::builtin::SplitMix64;

/// Fisher–Yates permutation of `0..n` for `epoch`.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xd6e8_feb8_6659_fd93));
    for i in (1..n).rev() {
        // Multiply-shift maps the 64-bit draw onto 0..=i without modulo bias worth
        // caring about for data order.
        let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    perm
}

/// Example indices for positions `start .. start + count` of the endless epoch stream.
pub struct DataOrder {
    seed: u64,
    n: usize,
    cached: Option<(u64, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(seed: u64, n: usize) -> Self {
        Self { seed, n, cached: None }
    }

    pub fn take(&mut self, start: u64, count: usize) -> Vec<usize> {
        if self.n == 0 {
            return Vec::new();
        }
        (start..start + count as u64)
            .map(|pos| {
                let epoch = pos / self.n as u64;
                if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
                    self.cached = Some((epoch, epoch_permutation(self.seed, epoch, self.n)));
                }
                self.cached.as_ref().expect("just filled").1[(pos % self.n as u64) as usize]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let a = epoch_permutation(3, 0, 50);
        let b = epoch_permutation(3, 1, 50);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_ne!(a, epoch_permutation(4, 0, 50));
    }

    #[test]
    fn positions_are_resumable() {
        let mut whole = DataOrder::new(9, 7);
        let all = whole.take(0, 30);
        let mut resumed = DataOrder::new(9, 7);
        assert_eq!(resumed.take(12, 18), all[12..].to_vec());
    }
}
