//! A dependency-free SVG scatter/line plot for the reward-versus-tax frontier:
//! one marker per online run, a polyline through the offline interpolation sweep.

use std::fmt::Write as _;

/// One plotted series.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    /// CSS colour.
    pub color: String,
    /// Points `(x, y, annotation)`; the annotation is written beside the marker
    /// when non-empty.
    pub points: Vec<(f64, f64, String)>,
    /// Join the points with a line (in the given order).
    pub line: bool,
}

/// A plot with labelled axes.
#[derive(Clone, Debug)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;

/// Round tick positions (1, 2, 5 times a power of ten) covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 7.0).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn fmt_tick(v: f64) -> String {
    let s = format!("{:.4}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl Plot {
    /// Padded data range of every finite point; a degenerate range is widened so
    /// a single point still gets axes.
    fn range(&self, pick: impl Fn(&(f64, f64, String)) -> f64) -> (f64, f64) {
        let vals: Vec<f64> = self.series.iter().flat_map(|s| s.points.iter().map(&pick)).filter(|v| v.is_finite()).collect();
        let (mut lo, mut hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        if vals.is_empty() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-9 {
            lo -= 0.5;
            hi += 0.5;
        }
        let pad = 0.08 * (hi - lo);
        (lo - pad, hi + pad)
    }

    /// The SVG document. Non-finite points are left out (a diverged run must not
    /// break the plot); the table still shows them.
    pub fn svg(&self) -> String {
        let (x0, x1) = self.range(|p| p.0);
        let (y0, y1) = self.range(|p| p.1);
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(s, r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#, LEFT + pw / 2.0, escape(&self.title));
        for t in ticks(x0, x1) {
            let x = sx(t);
            let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/>"##, TOP + ph);
            let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, TOP + ph + 18.0, fmt_tick(t));
        }
        for t in ticks(y0, y1) {
            let y = sy(t);
            let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/>"##, LEFT + pw);
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, fmt_tick(t));
        }
        let _ = writeln!(s, r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, LEFT + pw / 2.0, H - 22.0, escape(&self.x_label));
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        // Lines first, then markers of point series, so a line through a point
        // (the interpolation sweep ends at the AdamW model) never hides it.
        let order = self.series.iter().enumerate().filter(|(_, s)| s.line).chain(self.series.iter().enumerate().filter(|(_, s)| !s.line));
        for (i, ser) in order {
            let pts: Vec<&(f64, f64, String)> = ser.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
            let c = escape(&ser.color);
            if ser.line && pts.len() > 1 {
                let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
                let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#, path.join(" "));
            }
            for p in &pts {
                let (x, y) = (sx(p.0), sy(p.1));
                let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="{c}" stroke="black" stroke-width="0.5"/>"#);
                if !p.2.is_empty() {
                    let _ = writeln!(s, r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#333">{}</text>"##, x + 7.0, y - 6.0, escape(&p.2));
                }
            }
            let ly = TOP + 10.0 + 20.0 * i as f64;
            let lx = LEFT + pw + 16.0;
            let _ = writeln!(s, r#"<circle cx="{lx:.1}" cy="{ly:.1}" r="5" fill="{c}" stroke="black" stroke-width="0.5"/>"#);
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 12.0, ly + 4.0, escape(&ser.label));
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Plot {
        Plot {
            title: "reward vs tax <demo> & more".into(),
            x_label: "capability tax (pp)".into(),
            y_label: "judge score".into(),
            series: vec![
                Series { label: "SFT".into(), color: "#444".into(), points: vec![(0.0, 0.1, "sft".into())], line: false },
                Series { label: "AdamW".into(), color: "#d62728".into(), points: vec![(12.0, 0.9, "".into())], line: false },
                Series {
                    label: "offline interpolation".into(),
                    color: "#1f77b4".into(),
                    points: vec![(0.0, 0.1, "w=0".into()), (4.0, 0.5, "w=0.5".into()), (12.0, 0.9, "w=1".into()), (f64::NAN, 1.0, "x".into())],
                    line: true,
                },
            ],
        }
    }

    #[test]
    fn svg_is_well_formed_xml_with_every_finite_point() {
        let svg = sample().svg();
        let mut circles = 0;
        let mut depth = 0i32;
        for ev in xml::reader::EventReader::from_str(&svg) {
            match ev.expect("SVG must parse as XML") {
                xml::reader::XmlEvent::StartElement { name, .. } => {
                    depth += 1;
                    if name.local_name == "circle" {
                        circles += 1;
                    }
                }
                xml::reader::XmlEvent::EndElement { .. } => depth -= 1,
                _ => {}
            }
        }
        assert_eq!(depth, 0);
        // 5 finite points + 3 legend markers; the NaN point is dropped.
        assert_eq!(circles, 8);
        assert!(svg.contains("&lt;demo&gt; &amp; more"));
        assert!(svg.contains("<polyline"));
    }

    #[test]
    fn ticks_are_round_and_inside() {
        let t = ticks(-0.3, 12.7);
        assert!(t.len() >= 3 && t.len() <= 8, "{t:?}");
        assert!(t.iter().all(|&v| (-0.3..=12.7).contains(&v)));
        assert_eq!(fmt_tick(2.0), "2");
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(-0.0), "0");
    }

    #[test]
    fn single_point_still_has_a_range() {
        let p = Plot { title: "t".into(), x_label: "x".into(), y_label: "y".into(), series: vec![Series { label: "a".into(), color: "red".into(), points: vec![(1.0, 1.0, String::new())], line: false }] };
        assert!(!p.svg().contains("NaN"));
    }
}
