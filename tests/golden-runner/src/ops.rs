//! The dispatch from a case's `op` to merge-core. Each op names the SPEC.md
//! section it exercises; the NumPy oracle has the same table in `check_golden.py`.

use merge_core::arith;

use crate::{Array, Case, Outcome};

fn outputs<const N: usize>(items: [(&str, Array); N]) -> Outcome {
    Outcome::Outputs(items.into_iter().map(|(k, a)| (k.to_string(), a)).collect())
}

/// Evaluates one case with merge-core. `Err` means the case itself is malformed
/// (a bad golden file), not that merge-core rejected its inputs: that is
/// `Ok(Outcome::Error(..))`.
pub fn evaluate(case: &Case) -> Result<Outcome, String> {
    match case.op.as_str() {
        "arith" => arith_op(case),
        other => Err(format!("case {:?}: unknown op {other:?}", case.name)),
    }
}

/// SPEC.md §1.3-§1.5: one element-wise operation followed by the flush rule.
fn arith_op(case: &Case) -> Result<Outcome, String> {
    let a = case.f32s("a")?;
    let f = case.word("fn")?;
    let out: Vec<f32> = match f {
        "flush" => a.iter().map(|&x| arith::flush(x)).collect(),
        "sqrt" => a.iter().map(|&x| arith::sqrt(arith::flush(x))).collect(),
        "add" | "sub" | "mul" | "div" => {
            let b = case.f32s("b")?;
            if b.len() != a.len() {
                return Err(format!("case {:?}: inputs a and b differ in length", case.name));
            }
            let op: fn(f32, f32) -> f32 = match f {
                "add" => arith::add,
                "sub" => arith::sub,
                "mul" => arith::mul,
                _ => arith::div,
            };
            // Operands are loaded from storage, so F applies to them first (§1.3).
            a.iter().zip(b).map(|(&x, &y)| op(arith::flush(x), arith::flush(y))).collect()
        }
        other => return Err(format!("case {:?}: unknown arith fn {other:?}", case.name)),
    };
    Ok(outputs([("out", Array::F32(out))]))
}
