//! Plots of bench results as SVG (plotters' SVG backend: no fonts or
//! system libraries needed), committed beside the JSON and Markdown.
//!
//! `bench replot` redraws them from committed `results.json` files, so a
//! change of style does not need the runs again.
//!
//! Knows report structures and drawing; not how results were made.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::BenchError;
use super::device::{DEVICES, DeviceReport};
use super::scenarios::{ServerReport, TenantsReport};

const COLOURS: [RGBColor; 3] = [
    RGBColor(192, 0, 0),
    RGBColor(230, 120, 0),
    RGBColor(40, 90, 180),
];

fn failed(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Write {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Grouped bars: one group per label, one bar per series.
fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<(), BenchError> {
    let top = series
        .iter()
        .flat_map(|(_, values)| values.iter().copied())
        .fold(0.0f64, f64::max)
        // Headroom for the legend above the tallest bar.
        * 1.4;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top.max(1e-9))
        .map_err(|e| failed(path, e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .draw()
        .map_err(|e| failed(path, e))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (i, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let bars = values.iter().enumerate().map(|(g, &v)| {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], colour.filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| failed(path, e))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    // Each group's name centred under it, below the axis.
    let label_style = ("sans-serif", 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (g, label) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw_text(label, &label_style, (x, y + 8))
            .map_err(|e| failed(path, e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| failed(path, e))?;
    root.present().map_err(|e| failed(path, e))
}

/// `throughput.svg` and `power.svg` of a device report.
pub fn device_plots(report: &DeviceReport, dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let mut batches: Vec<usize> = report.points.iter().map(|p| p.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    let groups: Vec<String> = batches.iter().map(|b| format!("batch {b}")).collect();
    let series = |value: fn(&super::device::DevicePoint) -> f64| -> Vec<(&str, Vec<f64>)> {
        DEVICES
            .iter()
            .map(|&device| {
                let values = batches
                    .iter()
                    .map(|&b| {
                        report
                            .points
                            .iter()
                            .find(|p| p.device == device && p.batch == b)
                            .map_or(0.0, value)
                    })
                    .collect();
                (device, values)
            })
            .collect()
    };
    grouped_bars(
        &dir.join("throughput.svg"),
        "Output tokens/s of the 8-device group (emulated)",
        "tokens/s",
        &groups,
        &series(|p| p.tokens_per_device_s),
    )?;
    grouped_bars(
        &dir.join("power.svg"),
        "Mean power per device (emulated)",
        "W",
        &groups,
        &series(|p| p.watts_per_device),
    )
}

/// `shares.svg`: each tenant's token share beside its weight share.
pub fn tenant_plot(report: &TenantsReport, dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let groups: Vec<String> = report.tenants.iter().map(|t| t.slug.clone()).collect();
    grouped_bars(
        &dir.join("shares.svg"),
        "Share of output tokens against share of weight",
        "share",
        &groups,
        &[
            (
                "token share",
                report.tenants.iter().map(|t| t.token_share).collect(),
            ),
            (
                "weight share",
                report.tenants.iter().map(|t| t.weight_share).collect(),
            ),
        ],
    )
}

/// `latency.svg`: p99 TTFT and p99 time per output token against the
/// achieved request rate, one point per offered rate.
pub fn server_plot(report: &ServerReport, dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let path = dir.join("latency.svg");
    let points = |f: fn(&super::scenarios::RateResult) -> f64| -> Vec<(f64, f64)> {
        report
            .rates
            .iter()
            .map(|r| (r.run.requests_per_s, f(r)))
            .collect()
    };
    let ttft = points(|r| r.ttft_p99_ms);
    let tpot = points(|r| r.tpot_p99_ms);
    let x_max = ttft.iter().map(|p| p.0).fold(0.0f64, f64::max) * 1.1;
    let y_max = ttft
        .iter()
        .chain(&tpot)
        .map(|p| p.1)
        .fold(report.ttft_p99_bound_ms, f64::max)
        * 1.1;
    let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("p99 latency against throughput", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max.max(1e-9), 0.0..y_max.max(1e-9))
        .map_err(|e| failed(&path, e))?;
    chart
        .configure_mesh()
        .x_desc("completed requests/s")
        .y_desc("ms")
        .draw()
        .map_err(|e| failed(&path, e))?;
    for (i, (name, line)) in [("p99 TTFT", ttft), ("p99 time per output token", tpot)]
        .into_iter()
        .enumerate()
    {
        let colour = COLOURS[i * 2];
        chart
            .draw_series(std::iter::once(PathElement::new(
                line,
                colour.stroke_width(2),
            )))
            .map_err(|e| failed(&path, e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    let bound = report.ttft_p99_bound_ms;
    let bound_colour = RGBColor(0, 140, 60);
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, bound), (x_max, bound)],
            bound_colour.stroke_width(2),
        )))
        .map_err(|e| failed(&path, e))?
        .label("p99 TTFT bound")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], bound_colour));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| failed(&path, e))?;
    root.present().map_err(|e| failed(&path, e))
}

/// Redraws the plots of the report in `results` (a `results.json` of
/// `bench report`, `bench server` or `bench tenants`) beside it; returns
/// which kind it was.
pub fn replot(results: &Path) -> Result<&'static str, BenchError> {
    let text = std::fs::read_to_string(results).map_err(|e| failed(results, e))?;
    let dir = results.parent().unwrap_or(Path::new("."));
    if let Ok(report) = serde_json::from_str::<DeviceReport>(&text) {
        device_plots(&report, dir)?;
        return Ok("device report");
    }
    if let Ok(report) = serde_json::from_str::<ServerReport>(&text) {
        server_plot(&report, dir)?;
        return Ok("server scenario");
    }
    if let Ok(report) = serde_json::from_str::<TenantsReport>(&text) {
        tenant_plot(&report, dir)?;
        return Ok("tenants scenario");
    }
    Err(failed(
        results,
        "not the results.json of bench report, server or tenants",
    ))
}
