//! Named f32 tensors: the model's parameters, its gradients, and anything else laid
//! out the same way (Adam moments, reference deltas). Tensors are kept in canonical
//! order (ascending by name, bytewise) so that every consumer (optimizer, checkpoint,
//! global top-k) sees the same order.

use crate::model::par_map;

/// One named tensor, row-major.
#[derive(Debug, PartialEq)]
pub struct Tensor {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Clone for Tensor {
    fn clone(&self) -> Self {
        Tensor { name: self.name.clone(), shape: self.shape.clone(), data: self.data.clone() }
    }

    /// Copies into `self`'s buffers (the derived `clone_from` allocates anew): the
    /// trainer copies the optimizer's weights into the model every step, and a
    /// fresh buffer costs a page fault per 4 KiB and a TLB shootdown when freed.
    fn clone_from(&mut self, source: &Self) {
        self.name.clone_from(&source.name);
        self.shape.clone_from(&source.shape);
        self.data.clone_from(&source.data);
    }
}

/// A set of named tensors in canonical (name-sorted) order.
#[derive(Debug, Default, PartialEq)]
pub struct ParamSet {
    pub tensors: Vec<Tensor>,
}

impl Clone for ParamSet {
    fn clone(&self) -> Self {
        ParamSet { tensors: self.tensors.clone() }
    }

    /// Tensor by tensor into `self`'s buffers ([`Tensor::clone_from`]).
    fn clone_from(&mut self, source: &Self) {
        self.tensors.clone_from(&source.tensors);
    }
}

impl ParamSet {
    /// Builds a set from tensors in any order; sorts them into canonical order.
    pub fn new(mut tensors: Vec<Tensor>) -> Self {
        tensors.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Self { tensors }
    }

    /// A set with the same names and shapes, every element zero.
    pub fn zeros_like(&self) -> Self {
        let tensors = self
            .tensors
            .iter()
            .map(|t| Tensor { name: t.name.clone(), shape: t.shape.clone(), data: vec![0.0; t.data.len()] })
            .collect();
        Self { tensors }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// The first way `other` differs from this set in names, shapes or order (see
    /// [`layout_difference`]); element counts that disagree with a shape count as
    /// a shape difference.
    pub fn layout_difference(&self, other: &ParamSet) -> Option<LayoutDifference> {
        layout_difference(self.layout(), other.layout())
    }

    /// The first element (in tensor order) that is NaN or ±∞, as `(tensor
    /// index, element index)`. Blocks of [`SCAN_BLOCK`] elements are tested
    /// on up to `threads` threads without a branch per element; only a block
    /// that holds one is searched element by element.
    pub fn first_non_finite(&self, threads: usize) -> Option<(usize, usize)> {
        let blocks = self.blocks();
        let flagged = par_map(threads, blocks.len(), |i| {
            let (_, _, b) = blocks[i];
            // |x| + 2^23 (as bits) reaches the sign bit exactly when the exponent is all ones
            b.iter().fold(0u32, |acc, x| acc | ((x.to_bits() & 0x7fff_ffff) + 0x0080_0000)) & 0x8000_0000 != 0
        });
        let (&(t, start, b), _) = blocks.iter().zip(flagged).find(|(_, f)| *f)?;
        let at = b.iter().position(|x| !x.is_finite()).expect("the block was flagged");
        Some((t, start + at))
    }

    /// `sqrt(Σ x²)` over every element, in binary64 and in an order fixed by
    /// the layout alone (so the bits do not depend on `threads`): each block of
    /// [`SCAN_BLOCK`] elements of a tensor sums `x²` in eight lanes (element
    /// `i` in lane `i mod 8`, ascending), joins them as `((l0+l4)+(l1+l5)) +
    /// ((l2+l6)+(l3+l7))`, and the block sums are added in tensor and block
    /// order. The lanes let the sum run at the CPU's vector width.
    pub fn norm(&self, threads: usize) -> f64 {
        let blocks = self.blocks();
        let sums = par_map(threads, blocks.len(), |i| {
            let (_, _, b) = blocks[i];
            let mut lanes = [0f64; 8];
            let (eights, rest) = b.as_chunks::<8>();
            for e in eights {
                for (l, &x) in lanes.iter_mut().zip(e) {
                    *l += f64::from(x) * f64::from(x);
                }
            }
            for (l, &x) in lanes.iter_mut().zip(rest) {
                *l += f64::from(x) * f64::from(x);
            }
            ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        });
        sums.iter().sum::<f64>().sqrt()
    }

    /// `(tensor index, first element, elements)` of every block of at most
    /// [`SCAN_BLOCK`] elements, in tensor order.
    fn blocks(&self) -> Vec<(usize, usize, &[f32])> {
        self.tensors.iter().enumerate().flat_map(|(t, x)| x.data.chunks(SCAN_BLOCK).enumerate().map(move |(i, b)| (t, i * SCAN_BLOCK, b))).collect()
    }

    /// `(name, shape)` of every tensor, with the shape `[len]` for a tensor whose
    /// data does not hold `shape`'s product (so that no check misses it).
    pub fn layout(&self) -> impl Iterator<Item = (&str, Vec<usize>)> {
        self.tensors.iter().map(|t| {
            let shape = if t.shape.iter().product::<usize>() == t.data.len() { t.shape.clone() } else { vec![t.data.len()] };
            (t.name.as_str(), shape)
        })
    }
}

/// Elements per block of [`ParamSet::first_non_finite`] and [`ParamSet::norm`].
pub const SCAN_BLOCK: usize = 1 << 16;

/// The first difference between two tensor layouts, in bytewise name order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutDifference {
    /// The first layout has `tensor`, the second does not.
    Missing { tensor: String, shape: Vec<usize> },
    /// The second layout has `tensor`, the first does not.
    Extra { tensor: String, shape: Vec<usize> },
    /// Both have `tensor`, with different shapes (`ours` is the first layout's).
    Shape { tensor: String, ours: Vec<usize>, theirs: Vec<usize> },
    /// The same tensors and shapes, but tensor `position` of the second layout
    /// is `theirs` where the first has `ours`: consumers that pair tensors by
    /// position (the optimizer, the models' gradients) need one order.
    Order { position: usize, ours: String, theirs: String },
}

impl LayoutDifference {
    /// The difference in words, naming both sides (`ours` and `theirs`, e.g. "the
    /// policy" and "the gradient").
    pub fn describe(&self, ours: &str, theirs: &str) -> String {
        match self {
            LayoutDifference::Missing { tensor, shape } => format!("tensor `{tensor}` (shape {shape:?}) is in {ours} but missing from {theirs}"),
            LayoutDifference::Extra { tensor, shape } => format!("tensor `{tensor}` (shape {shape:?}) is in {theirs} but not in {ours}"),
            LayoutDifference::Shape { tensor, ours: a, theirs: b } => format!("tensor `{tensor}` has shape {a:?} in {ours} but {b:?} in {theirs}"),
            LayoutDifference::Order { position, ours: a, theirs: b } => {
                format!("tensor {position} is `{a}` in {ours} but `{b}` in {theirs} (tensors must come in bytewise name order)")
            }
        }
    }

    /// The tensor the difference is about.
    pub fn tensor(&self) -> &str {
        match self {
            LayoutDifference::Missing { tensor, .. } | LayoutDifference::Extra { tensor, .. } | LayoutDifference::Shape { tensor, .. } => tensor,
            LayoutDifference::Order { theirs, .. } => theirs,
        }
    }
}

/// Compares two layouts given as `(name, shape)` in any order: the first tensor in
/// bytewise name order that is missing, extra or of another shape; then, if the
/// sets agree, the first position where the two orders differ. The one layout
/// check behind the optimizer's, the model's, the loader's and `merge`'s errors.
pub fn layout_difference<'a, S: AsRef<[usize]>>(
    ours: impl IntoIterator<Item = (&'a str, S)>,
    theirs: impl IntoIterator<Item = (&'a str, S)>,
) -> Option<LayoutDifference> {
    let ours: Vec<(&str, S)> = ours.into_iter().collect();
    let theirs: Vec<(&str, S)> = theirs.into_iter().collect();
    let sorted = |v: &[(&'a str, S)]| {
        let mut ix: Vec<usize> = (0..v.len()).collect();
        ix.sort_by(|&a, &b| v[a].0.as_bytes().cmp(v[b].0.as_bytes()));
        ix
    };
    let (a, b) = (sorted(&ours), sorted(&theirs));
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let x = a.get(i).map(|&k| &ours[k]);
        let y = b.get(j).map(|&k| &theirs[k]);
        match (x, y) {
            (Some((n, s)), Some((m, t))) if n == m => {
                if s.as_ref() != t.as_ref() {
                    return Some(LayoutDifference::Shape { tensor: n.to_string(), ours: s.as_ref().to_vec(), theirs: t.as_ref().to_vec() });
                }
                i += 1;
                j += 1;
            }
            (Some((n, s)), Some((m, _))) if n.as_bytes() < m.as_bytes() => {
                return Some(LayoutDifference::Missing { tensor: n.to_string(), shape: s.as_ref().to_vec() });
            }
            (Some((n, s)), None) => return Some(LayoutDifference::Missing { tensor: n.to_string(), shape: s.as_ref().to_vec() }),
            (_, Some((m, t))) => return Some(LayoutDifference::Extra { tensor: m.to_string(), shape: t.as_ref().to_vec() }),
            (None, None) => unreachable!("the loop runs while one side has tensors"),
        }
    }
    let position = ours.iter().zip(&theirs).position(|(x, y)| x.0 != y.0)?;
    Some(LayoutDifference::Order { position, ours: ours[position].0.to_string(), theirs: theirs[position].0.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[(&str, &[usize])]) -> Vec<(&'static str, Vec<usize>)> {
        names.iter().map(|(n, s)| (String::leak(n.to_string()) as &str, s.to_vec())).collect()
    }

    #[test]
    fn layout_difference_finds_the_first_difference_in_name_order() {
        let a = set(&[("a", &[2]), ("b", &[3]), ("c", &[4])]);
        assert_eq!(layout_difference(a.clone(), a.clone()), None);
        let missing = set(&[("a", &[2]), ("c", &[4])]);
        assert_eq!(layout_difference(a.clone(), missing.clone()), Some(LayoutDifference::Missing { tensor: "b".into(), shape: vec![3] }));
        assert_eq!(layout_difference(missing, a.clone()), Some(LayoutDifference::Extra { tensor: "b".into(), shape: vec![3] }));
        let extra_last = set(&[("a", &[2]), ("b", &[3]), ("c", &[4]), ("d", &[1])]);
        assert_eq!(layout_difference(a.clone(), extra_last), Some(LayoutDifference::Extra { tensor: "d".into(), shape: vec![1] }));
        let reshaped = set(&[("a", &[2]), ("b", &[1, 3]), ("c", &[4])]);
        assert_eq!(layout_difference(a.clone(), reshaped), Some(LayoutDifference::Shape { tensor: "b".into(), ours: vec![3], theirs: vec![1, 3] }));
        // Bytewise: "B" (0x42) sorts before "a" (0x61).
        let upper = set(&[("B", &[1]), ("a", &[2]), ("b", &[3]), ("c", &[4])]);
        assert_eq!(layout_difference(a.clone(), upper), Some(LayoutDifference::Extra { tensor: "B".into(), shape: vec![1] }));
        let shuffled = set(&[("b", &[3]), ("a", &[2]), ("c", &[4])]);
        let d = layout_difference(a, shuffled).unwrap();
        assert_eq!(d, LayoutDifference::Order { position: 0, ours: "a".into(), theirs: "b".into() });
        assert!(d.describe("the policy", "the gradient").contains("tensor 0 is `a` in the policy but `b` in the gradient"), "{}", d.describe("p", "g"));
    }

    #[test]
    fn a_tensor_whose_data_disagrees_with_its_shape_is_a_shape_difference() {
        let good = ParamSet::new(vec![Tensor { name: "w".into(), shape: vec![2, 2], data: vec![0.0; 4] }]);
        let short = ParamSet::new(vec![Tensor { name: "w".into(), shape: vec![2, 2], data: vec![0.0; 3] }]);
        assert_eq!(good.layout_difference(&short), Some(LayoutDifference::Shape { tensor: "w".into(), ours: vec![2, 2], theirs: vec![3] }));
        assert_eq!(good.layout_difference(&good.zeros_like()), None);
    }

    fn scan_set() -> ParamSet {
        let mut rng = crate::data::builtin::SplitMix64::new(5);
        let mut next = move || rng.next_normal() as f32;
        let lens = [3, 2 * SCAN_BLOCK + 5, 0, SCAN_BLOCK, 17];
        let tensors = lens.iter().enumerate().map(|(i, &n)| Tensor { name: format!("t{i}"), shape: vec![n], data: (0..n).map(|_| next()).collect() }).collect();
        ParamSet::new(tensors)
    }

    #[test]
    fn the_first_non_finite_element_is_found_on_any_thread_count() {
        let mut set = scan_set();
        // the largest finite values, subnormals and signed zeros are finite
        set.tensors[1].data[..4].copy_from_slice(&[f32::MAX, -f32::MAX, f32::from_bits(1), -0.0]);
        for threads in [1, 2, 3, 8] {
            assert_eq!(set.first_non_finite(threads), None);
        }
        let planted = [(4, 16, f32::NEG_INFINITY), (1, 2 * SCAN_BLOCK + 1, f32::NAN), (3, SCAN_BLOCK - 1, f32::from_bits(0xff80_0001)), (1, SCAN_BLOCK, f32::INFINITY)];
        let mut want = Vec::new();
        for (t, i, v) in planted {
            set.tensors[t].data[i] = v;
            want.push((t, i));
            want.sort();
            for threads in [1, 2, 3, 8] {
                assert_eq!(set.first_non_finite(threads), Some(want[0]), "{threads} threads");
            }
        }
    }

    #[test]
    fn the_norm_has_the_same_bits_on_any_thread_count_and_follows_its_definition() {
        let set = scan_set();
        let mut by_definition = 0f64;
        for t in &set.tensors {
            for block in t.data.chunks(SCAN_BLOCK) {
                let mut lanes = [0f64; 8];
                for (i, &x) in block.iter().enumerate() {
                    lanes[i % 8] += f64::from(x) * f64::from(x);
                }
                by_definition += ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            }
        }
        let norm = set.norm(1);
        assert_eq!(norm.to_bits(), by_definition.sqrt().to_bits());
        for threads in [2, 3, 8] {
            assert_eq!(set.norm(threads).to_bits(), norm.to_bits(), "{threads} threads");
        }
        let plain = set.tensors.iter().flat_map(|t| &t.data).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        assert!((norm - plain).abs() <= 1e-12 * plain, "{norm} against the plain sum {plain}");
    }
}
