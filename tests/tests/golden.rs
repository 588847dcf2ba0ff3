//! (a) merge-core, compiled natively, reproduces every committed golden vector bit for bit.

use workspace_tests::golden_files;

#[test]
fn merge_core_reproduces_every_golden_vector() {
    let mut failures = Vec::new();
    let mut total = 0;
    for path in golden_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = golden_runner::check_file(&text).unwrap_or_else(|e| panic!("{}: malformed golden file: {e}", path.display()));
        assert!(report.cases > 0, "{}: no cases", path.display());
        total += report.cases;
        failures.extend(report.failures.into_iter().map(|f| format!("{}: {f}", path.display())));
    }
    assert!(failures.is_empty(), "{} of {total} golden cases differ from merge-core:\n{}", failures.len(), failures.join("\n"));
}

/// The comparison itself must be able to fail: flipping one bit of one expected
/// value has to be reported with its index.
#[test]
fn a_changed_bit_is_reported() {
    let path = &golden_files()[0];
    let text = std::fs::read_to_string(path).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = doc["cases"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["expected"].get("outputs").is_some())
        .expect("a case with outputs");
    let outputs = case["expected"]["outputs"].as_object_mut().unwrap();
    let (_, arr) = outputs.iter_mut().find(|(_, a)| a.get("hex").is_some()).expect("an output with hex values");
    let hex = arr["hex"].as_str().unwrap().to_string();
    let (first, rest) = hex.split_once(' ').unwrap_or((&hex, ""));
    let width = first.len();
    let flipped = u32::from_str_radix(first, 16).unwrap() ^ 1;
    arr["hex"] = format!("{flipped:0width$x} {rest}").trim_end().into();
    let report = golden_runner::check_file(&doc.to_string()).unwrap();
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(report.failures[0].contains("first at index 0"), "{}", report.failures[0]);
}
