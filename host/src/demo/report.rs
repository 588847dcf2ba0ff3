//! The demo's results: one row per model (SFT reference, each online optimizer,
//! each offline interpolation weight), written as a terminal table, CSV and JSON.

use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// How a row's model was produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The SFT model every alignment run starts from.
    Sft,
    /// DPO with an optimizer (AdamW, OnDARE, OnTIES).
    Online,
    /// The AdamW-aligned model interpolated back toward SFT.
    Offline,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sft => "sft",
            Kind::Online => "online",
            Kind::Offline => "offline",
        }
    }
}

/// Reward and tax measurements of one model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Short unique label, e.g. `ondare p=0.1 a=1e-5`.
    pub name: String,
    pub kind: Kind,
    /// `sft`, `adamw`, `ondare`, `onties`.
    pub optimizer: String,
    /// Reserve rate, for the merging optimizers.
    pub p: Option<f64>,
    /// Merge weight toward the SFT delta, for the merging optimizers.
    pub alpha: Option<f64>,
    /// Weight of the aligned model in the offline interpolation (1 = the aligned
    /// model, 0 = SFT).
    pub weight: Option<f64>,
    /// Held-out preference accuracy: share of pairs whose implicit DPO reward
    /// (beta * (log pi - log pi_sft)) is higher for the chosen answer.
    pub pref_accuracy: f64,
    /// Held-out mean implicit reward margin (chosen minus rejected).
    pub reward_margin: f64,
    /// Mean judge score on sampled generations for held-out prompts.
    pub judge: f64,
    /// Capability: exact-match accuracy on held-out addition problems (greedy).
    pub capability: f64,
    /// Perplexity on held-out pretraining text.
    pub perplexity: f64,
    /// Seconds spent producing this model (0 for offline merges' evaluation-only rows).
    pub train_seconds: f64,
}

impl Row {
    /// Alignment tax on the capability: SFT accuracy minus this accuracy, in
    /// percentage points (positive = capability lost).
    pub fn capability_tax(&self, sft: &Row) -> f64 {
        100.0 * (sft.capability - self.capability)
    }

    /// Relative perplexity change against SFT, in percent (positive = worse).
    pub fn perplexity_tax(&self, sft: &Row) -> f64 {
        100.0 * (self.perplexity / sft.perplexity - 1.0)
    }
}

/// A run of the sweep that produced no model, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailedRun {
    pub name: String,
    pub error: String,
}

/// A complete demo report: the settings it ran with and its rows, SFT first.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub settings: serde_json::Value,
    pub rows: Vec<Row>,
    pub failed: Vec<FailedRun>,
    pub total_seconds: f64,
}

impl Report {
    /// The SFT reference row. Every report has one: the pipeline evaluates SFT
    /// before any alignment run.
    pub fn sft(&self) -> Option<&Row> {
        self.rows.iter().find(|r| r.kind == Kind::Sft)
    }

    fn header() -> [&'static str; 11] {
        [
            "name", "pref_acc", "margin", "judge", "capability", "cap_tax_pp", "perplexity", "ppl_tax_%", "p", "alpha", "train_s",
        ]
    }

    fn cells(&self, r: &Row) -> [String; 11] {
        let opt = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
        let (ct, pt) = match self.sft() {
            Some(s) => (format!("{:+.1}", r.capability_tax(s)), format!("{:+.2}", r.perplexity_tax(s))),
            None => (String::new(), String::new()),
        };
        [
            r.name.clone(),
            format!("{:.3}", r.pref_accuracy),
            format!("{:+.3}", r.reward_margin),
            format!("{:.3}", r.judge),
            format!("{:.3}", r.capability),
            ct,
            format!("{:.4}", r.perplexity),
            pt,
            opt(r.p),
            opt(r.alpha),
            format!("{:.1}", r.train_seconds),
        ]
    }

    /// The terminal table: aligned columns, SFT first, taxes relative to SFT.
    pub fn table(&self) -> String {
        let header = Self::header().map(String::from);
        let rows: Vec<[String; 11]> = self.rows.iter().map(|r| self.cells(r)).collect();
        let mut width = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String; 11]| {
            for (i, (c, w)) in cells.iter().zip(width).enumerate() {
                // Names left-aligned, numbers right-aligned so digits line up.
                if i == 0 {
                    let _ = write!(out, "{c:<w$}");
                } else {
                    let _ = write!(out, "  {c:>w$}");
                }
            }
            out.push('\n');
        };
        line(&mut out, &header);
        let total: usize = width.iter().sum::<usize>() + 2 * (width.len() - 1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for r in &rows {
            line(&mut out, r);
        }
        for f in &self.failed {
            let _ = writeln!(out, "{}: no result: {}", f.name, f.error);
        }
        out
    }

    /// CSV with full precision (RFC 4180 quoting for names).
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "name,kind,optimizer,p,alpha,weight,pref_accuracy,reward_margin,judge,capability,capability_tax_pp,perplexity,perplexity_tax_pct,train_seconds\n",
        );
        let opt = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
        for r in &self.rows {
            let (ct, pt) = match self.sft() {
                Some(s) => (format!("{}", r.capability_tax(s)), format!("{}", r.perplexity_tax(s))),
                None => (String::new(), String::new()),
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&r.name),
                r.kind.as_str(),
                csv_field(&r.optimizer),
                opt(r.p),
                opt(r.alpha),
                opt(r.weight),
                r.pref_accuracy,
                r.reward_margin,
                r.judge,
                r.capability,
                ct,
                r.perplexity,
                pt,
                r.train_seconds
            );
        }
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report holds only finite numbers and strings")
    }

    /// Writes `results.csv`, `results.json` and `results.txt` (the table) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        for (file, text) in [("results.csv", self.csv()), ("results.json", self.json()), ("results.txt", self.table())] {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, kind: Kind, cap: f64, ppl: f64) -> Row {
        Row {
            name: name.into(),
            kind,
            optimizer: if kind == Kind::Sft { "sft".into() } else { "adamw".into() },
            p: None,
            alpha: None,
            weight: None,
            pref_accuracy: 0.5,
            reward_margin: 0.25,
            judge: 0.75,
            capability: cap,
            perplexity: ppl,
            train_seconds: 1.5,
        }
    }

    fn report() -> Report {
        let mut on = row("ondare p=0.1, a=1e-5", Kind::Online, 0.8, 3.3);
        on.p = Some(0.1);
        on.alpha = Some(1e-5);
        Report {
            settings: serde_json::json!({"seed": 1}),
            rows: vec![row("sft", Kind::Sft, 0.9, 3.0), row("adamw", Kind::Online, 0.6, 3.6), on],
            failed: Vec::new(),
            total_seconds: 10.0,
        }
    }

    #[test]
    fn taxes_are_relative_to_sft() {
        let r = report();
        let sft = r.sft().unwrap();
        assert!((r.rows[1].capability_tax(sft) - 30.0).abs() < 1e-9);
        assert!((r.rows[1].perplexity_tax(sft) - 20.0).abs() < 1e-9);
    }

    #[test]
    fn csv_has_one_line_per_row_and_quotes_commas() {
        let csv = report().csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        let cols = lines[0].split(',').count();
        assert_eq!(lines[1].split(',').count(), cols);
        assert!(lines[3].starts_with("\"ondare p=0.1, a=1e-5\",online,adamw,0.1,0.00001,"), "{}", lines[3]);
        assert!(lines[2].contains(",30.000000000000004,") || lines[2].contains(",30,"), "{}", lines[2]);
    }

    #[test]
    fn json_round_trips_the_numbers() {
        let v: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        assert_eq!(v["rows"][0]["kind"], "sft");
        assert_eq!(v["rows"][2]["p"], 0.1);
        assert_eq!(v["rows"][1]["capability"], 0.6);
        assert!(v["rows"][0]["alpha"].is_null());
    }

    #[test]
    fn failed_runs_are_listed_under_the_table() {
        let mut r = report();
        r.failed.push(FailedRun { name: "onties p=0.1 a=0.001".into(), error: "step 3: gradient non-finite".into() });
        let t = r.table();
        assert!(t.lines().last().unwrap().starts_with("onties p=0.1 a=0.001: no result: step 3"), "{t}");
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["failed"][0]["error"], "step 3: gradient non-finite");
    }

    #[test]
    fn table_columns_line_up() {
        let t = report().table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        let w = lines[0].len();
        assert!(lines.iter().all(|l| l.len() == w), "{t}");
        assert!(lines[2].contains("+0.0"), "SFT's own tax is zero: {t}");
    }
}
