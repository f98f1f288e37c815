//! Medians and ratio tables.

pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// One table row: a workload, each contender's figure, and the ratios against the first.
pub struct Row {
    pub workload: String,
    pub unit: &'static str,
    /// True when larger is better (throughput); false for times.
    pub higher_is_better: bool,
    pub values: Vec<f64>,
}

/// Markdown table. Ratios are "how many times better vmbuild (the first column) is".
pub fn markdown(contenders: &[&str], rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| workload |");
    for c in contenders {
        out.push_str(&format!(" {c} |"));
    }
    for c in &contenders[1..] {
        out.push_str(&format!(" {} vs {c} |", contenders[0]));
    }
    out.push('\n');
    out.push_str(&"|---".repeat(contenders.len() * 2));
    out.push_str("|\n");
    for r in rows {
        out.push_str(&format!("| {} ({}) |", r.workload, r.unit));
        for v in &r.values {
            out.push_str(&format!(" {} |", fmt(*v)));
        }
        for v in &r.values[1..] {
            let ratio = if r.higher_is_better {
                r.values[0] / v
            } else {
                v / r.values[0]
            };
            if ratio.is_finite() {
                out.push_str(&format!(" {ratio:.2}× |"));
            } else {
                out.push_str(" – |");
            }
        }
        out.push('\n');
    }
    out
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
