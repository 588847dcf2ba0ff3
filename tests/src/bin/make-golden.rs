//! Writes the golden vectors of `tests/golden/` from merge-core.
//!
//! usage: `cargo run -p workspace-tests --bin make-golden [-- <output dir>]`
//!
//! The inputs are built here (edge values plus a seeded pseudo-random spread over
//! the whole binary32 range), the expected outputs are whatever merge-core computes
//! now. Rerun it only when SPEC.md changes on purpose, and review the diff: the
//! committed files are what catches an unintended change in the arithmetic.

use std::path::PathBuf;

use golden_runner::{Array, Case, file_json};

/// splitmix64: a fixed, documented input generator so regenerating gives the same inputs.
struct Inputs(u64);

impl Inputs {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A finite binary32 with random sign, significand and a biased exponent in
    /// `[lo, hi]` (0 gives subnormals and zeros, 254 the largest binade).
    fn spread(&mut self, lo: u32, hi: u32) -> f32 {
        let r = self.next();
        let exp = lo + (r as u32 % (hi - lo + 1));
        let sig = (r >> 32) as u32 & 0x007f_ffff;
        let sign = ((r >> 63) as u32) << 31;
        f32::from_bits(sign | exp << 23 | sig)
    }
}

/// Values every element-wise path must meet: zeros of both signs, subnormals at
/// both ends, the normal boundary, ones, huge and tiny magnitudes.
const EDGES: [u32; 16] = [
    0x0000_0000, 0x8000_0000, // ±0
    0x0000_0001, 0x807f_ffff, // smallest and largest subnormal
    0x0080_0000, 0x8080_0000, // ±smallest normal
    0x0080_0001, 0x3f80_0000, 0xbf80_0000, // just above it, ±1
    0x3f7f_ffff, 0x4b80_0000, // just below 1, 2^24
    0x7f7f_ffff, 0xff7f_ffff, // ±largest finite
    0x1e3c_e508, 0x6c4e_cb8f, 0x3a83_126f, // 1e-20, 1e27, 1e-3
];

fn edges() -> Vec<f32> {
    EDGES.iter().map(|&b| f32::from_bits(b)).collect()
}

fn arith_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut rng = Inputs(1);
    // Every pair of edge values, then random operands across all exponents.
    let e = edges();
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for &x in &e {
        for &y in &e {
            ea.push(x);
            eb.push(y);
        }
    }
    // Products that land at the normal boundary: 2^-126 - 2^-150 rounds (ties to
    // even) up to the smallest normal and survives F; 2^-126 - 2^-149 is the
    // largest subnormal and is flushed.
    let half = f32::from_bits(0x1f00_0000); // 2^-63
    ea.extend([half, half, -half]);
    eb.extend([f32::from_bits(0x1eff_ffff), f32::from_bits(0x1eff_fffe), f32::from_bits(0x1eff_ffff)]);
    let ra: Vec<f32> = (0..512).map(|_| rng.spread(0, 254)).collect();
    let rb: Vec<f32> = (0..512).map(|_| rng.spread(0, 254)).collect();
    for f in ["add", "sub", "mul", "div"] {
        for (tag, a, b) in [("edges", &ea, &eb), ("spread", &ra, &rb)] {
            // Division by zero never happens in the merge path (SPEC.md §1.5), and
            // 0/0 would give a NaN whose bits are platform-specific.
            let (a, b): (Vec<f32>, Vec<f32>) = if f == "div" {
                a.iter().zip(b.iter()).filter(|&(_, y)| y.to_bits() & 0x7f80_0000 != 0).map(|(&x, &y)| (x, y)).unzip()
            } else {
                (a.clone(), b.clone())
            };
            let mut c = Case::new(&format!("{f}_{tag}"), "arith");
            c.params.insert("fn".into(), f.into());
            c.inputs.insert("a".into(), Array::F32(a));
            c.inputs.insert("b".into(), Array::F32(b));
            cases.push(c);
        }
    }
    // sqrt of negative values is NaN (platform-specific bits) and never happens.
    let mut sq: Vec<f32> = e.iter().map(|x| x.abs()).collect();
    sq.extend((0..512).map(|_| rng.spread(0, 254).abs()));
    let mut c = Case::new("sqrt", "arith");
    c.params.insert("fn".into(), "sqrt".into());
    c.inputs.insert("a".into(), Array::F32(sq));
    cases.push(c);
    let mut c = Case::new("flush", "arith");
    c.params.insert("fn".into(), "flush".into());
    let mut fl = e.clone();
    fl.extend((0..256).map(|_| rng.spread(0, 2)));
    c.inputs.insert("a".into(), Array::F32(fl));
    cases.push(c);
    cases
}

fn main() {
    let dir = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(workspace_tests::golden_dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let files: Vec<(&str, &str, Vec<Case>)> =
        vec![("arith.json", "SPEC.md §1.3-§1.5: + - * / sqrt on binary32, each followed by the flush rule", arith_cases())];
    for (name, about, cases) in files {
        let text = file_json(about, &cases).unwrap_or_else(|e| panic!("{name}: {e}"));
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("wrote {} ({} cases)", path.display(), cases.len());
    }
}
