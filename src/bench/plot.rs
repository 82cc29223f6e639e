//! Plots of bench results as SVG (plotters' SVG backend: no fonts or
//! system libraries needed), committed beside the JSON and Markdown.
//!
//! Knows report structures and drawing; not how results were made.

use std::path::Path;

use plotters::prelude::*;

use super::BenchError;
use super::device::{DEVICES, DeviceReport};

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

/// Grouped bars: one group per batch size, one bar per device.
fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    batches: &[usize],
    value: impl Fn(&str, usize) -> f64,
) -> Result<(), BenchError> {
    let top = batches
        .iter()
        .flat_map(|&b| DEVICES.iter().map(move |d| (d, b)))
        .map(|(d, b)| value(d, b))
        .fold(0.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(path, e))?;
    let groups = batches.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..groups, 0.0..top.max(1e-9))
        .map_err(|e| failed(path, e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .draw()
        .map_err(|e| failed(path, e))?;
    let width = 0.8 / DEVICES.len() as f64;
    for (g, &batch) in batches.iter().enumerate() {
        for (i, device) in DEVICES.iter().enumerate() {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            let v = value(device, batch);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, v)],
                    COLOURS[i].filled(),
                )))
                .map_err(|e| failed(path, e))?
                .label(if g == 0 { *device } else { "" })
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], COLOURS[i].filled())
                });
        }
        chart
            .draw_series(std::iter::once(Text::new(
                format!("batch {batch}"),
                (g as f64 + 0.4, top * 0.02),
                ("sans-serif", 14),
            )))
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
    let get = |device: &str, batch: usize, f: fn(&super::device::DevicePoint) -> f64| {
        report
            .points
            .iter()
            .find(|p| p.device == device && p.batch == batch)
            .map_or(0.0, f)
    };
    grouped_bars(
        &dir.join("throughput.svg"),
        "Output tokens/s of the 8-device group (emulated)",
        "tokens/s",
        &batches,
        |d, b| get(d, b, |p| p.tokens_per_device_s),
    )?;
    grouped_bars(
        &dir.join("power.svg"),
        "Mean power per device (emulated)",
        "W",
        &batches,
        |d, b| get(d, b, |p| p.watts_per_device),
    )
}
