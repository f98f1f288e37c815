//! SVG plots of a bench run: a box plot per workload with one box per contender, and for
//! the snapshot suite revive latency (p50 and p99) against guest memory size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::sample::Sample;
use super::suite::Suite;

/// Draws every plot for `suite`'s `samples` into `dir`; the files written.
pub fn draw(dir: &Path, suite: Suite, samples: &[Sample]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for ((workload, params), group) in groups(samples) {
        let title = if params.is_empty() {
            workload.clone()
        } else {
            format!("{workload} ({params})")
        };
        let path = dir.join(format!("{}-{}.svg", suite.name(), slug(&title)));
        box_plot(&path, &title, &group)?;
        written.push(path);
    }
    if suite == Suite::Snapshot {
        for workload in ["revive → running", "revive → next output"] {
            let path = dir.join(format!("snapshot-latency-vs-memory-{}.svg", slug(workload)));
            if latency_against_memory(&path, workload, samples)? {
                written.push(path);
            }
        }
    }
    Ok(written)
}

/// Samples by workload and parameters (all but the round), contenders in first-seen order.
type Group<'a> = Vec<(String, Vec<&'a Sample>)>;

fn groups(samples: &[Sample]) -> BTreeMap<(String, String), Group<'_>> {
    let mut out: BTreeMap<(String, String), Group<'_>> = BTreeMap::new();
    for s in samples {
        let params = s
            .params
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(t) => format!("{k} {t}"),
                other => format!("{k} {other}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let group = out.entry((s.workload.clone(), params)).or_default();
        match group.iter_mut().find(|(c, _)| *c == s.contender) {
            Some((_, v)) => v.push(s),
            None => group.push((s.contender.clone(), vec![s])),
        }
    }
    out
}

fn box_plot(path: &Path, title: &str, group: &Group<'_>) -> anyhow::Result<()> {
    let unit = group
        .first()
        .and_then(|(_, v)| v.first())
        .map_or("", |s| s.unit.as_str());
    let labels: Vec<String> = group.iter().map(|(c, _)| short(c)).collect();
    let quartiles: Vec<Quartiles> = group
        .iter()
        .map(|(_, v)| Quartiles::new(&v.iter().map(|s| s.value).collect::<Vec<_>>()))
        .collect();
    let (lo, hi) = group
        .iter()
        .flat_map(|(_, v)| v.iter().map(|s| s.value))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.02).max(1e-9);
    let (lo, hi) = ((lo - pad).max(0.0) as f32, (hi + pad) as f32);

    let width = 220 + 160 * labels.len() as u32;
    let root = SVGBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(labels[..].into_segmented(), lo..hi)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .y_desc(unit)
        .disable_x_mesh()
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(labels.iter().zip(&quartiles).map(|(label, q)| {
            Boxplot::new_vertical(SegmentValue::CenterOf(label), q)
                .width(40)
                .style(BLUE)
        }))
        .map_err(plot_error)?;
    // Every sample as a dot beside its box: with a handful of rounds the box alone hides
    // how few there were.
    for ((label, (_, samples)), _) in labels.iter().zip(group).zip(&quartiles) {
        chart
            .draw_series(samples.iter().map(|s| {
                Circle::new(
                    (SegmentValue::CenterOf(label), s.value as f32),
                    2,
                    RED.filled(),
                )
            }))
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// p50 (lines) and p99 (crosses) of `workload` against guest memory, one series per
/// method and cache state; false if the samples hold no such figures.
fn latency_against_memory(path: &Path, workload: &str, samples: &[Sample]) -> anyhow::Result<bool> {
    let mut series: BTreeMap<(String, String), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.workload == workload) {
        let (Some(mib), Some(cache)) = (
            s.params.get("memory_mib").and_then(|v| v.as_u64()),
            s.params.get("cache").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        series
            .entry((s.contender.clone(), cache.to_owned()))
            .or_default()
            .entry(mib)
            .or_default()
            .push(s.value);
    }
    if series.is_empty() {
        return Ok(false);
    }
    let sizes: Vec<u64> = series.values().flat_map(|m| m.keys().copied()).collect();
    let (x_lo, x_hi) = (
        *sizes.iter().min().unwrap() as f64,
        *sizes.iter().max().unwrap() as f64,
    );
    let y_hi = series
        .values()
        .flat_map(|m| m.values().map(|v| percentile(v, 99.0)))
        .fold(0.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: p50 (line) and p99 (cross) against guest memory"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_lo * 0.9)..(x_hi * 1.1), 0.0..y_hi.max(1e-3))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("guest memory (MiB)")
        .y_desc("s")
        .draw()
        .map_err(plot_error)?;
    for (i, ((method, cache), by_size)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let p50: Vec<(f64, f64)> = by_size
            .iter()
            .map(|(m, v)| (*m as f64, percentile(v, 50.0)))
            .collect();
        let p99: Vec<(f64, f64)> = by_size
            .iter()
            .map(|(m, v)| (*m as f64, percentile(v, 99.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(p50, colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{}, {cache}", short(method)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(p99.into_iter().map(|p| Cross::new(p, 5, colour)))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(true)
}

/// The `p`th percentile by nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// A contender's name short enough for an axis label.
fn short(name: &str) -> String {
    let mut s: String = name.chars().take(34).collect();
    if name.chars().count() > 34 {
        s.push('…');
    }
    s
}

fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').chars().take(90).collect()
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(workload: &str, contender: &str, value: f64, mib: u64, cache: &str) -> Sample {
        Sample::new(workload, contender, "s", false, 1, value)
            .with("memory_mib", mib)
            .with("cache", cache)
    }

    #[test]
    fn snapshot_samples_give_box_plots_and_latency_curves_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut samples = Vec::new();
        for mib in [256, 512] {
            for (i, v) in [0.1, 0.2, 0.15].into_iter().enumerate() {
                samples.push(sample(
                    "revive → running",
                    "gzip",
                    v * 10.0 + i as f64,
                    mib,
                    "cold",
                ));
                samples.push(sample("revive → running", "zstd", v, mib, "cold"));
            }
        }
        let files = draw(dir.path(), Suite::Snapshot, &samples).unwrap();
        // Two box plots (one per memory size) and one latency curve.
        assert_eq!(files.len(), 3, "{files:?}");
        for f in &files {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(svg.starts_with("<svg"), "{}", f.display());
            assert!(svg.contains("zstd"), "{} names its contenders", f.display());
        }
        assert!(files
            .iter()
            .any(|f| f.to_string_lossy().contains("latency-vs-memory")));
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
