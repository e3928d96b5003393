//! The PNG: a horizontal strip plot, one row per phase, every sample of each
//! variant as a dot (log time axis) and its median as a bar.

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::VARIANTS;
use crate::report::Report;
use crate::stats::{PHASES, summarize};

/// Debian's fonts-dejavu-core (scripts/setup installs it).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
];

pub fn draw(r: &Report, path: &Path, date: &str) -> Result<(), Box<dyn Error>> {
    let font: &'static [u8] = Box::leak(std::fs::read(FONT)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "cannot load the font")?;

    // Rows top to bottom: the phases, then the burst.
    let mut rows: Vec<(String, Vec<Vec<f64>>)> = PHASES
        .iter()
        .map(|p| {
            (
                p.short.to_string(),
                VARIANTS.iter().map(|v| r.values(v, p.key)).collect(),
            )
        })
        .collect();
    let burst: Vec<f64> = r.bursts.iter().flat_map(|b| b.ready_ms.clone()).collect();
    rows.push((
        "burst of 8: update->each Ready".into(),
        vec![burst, Vec::new(), Vec::new()],
    ));
    let n = rows.len();
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|(_, vs)| vs.iter().flatten().copied())
        .filter(|x| *x > 0.0)
        .collect();
    let lo = all.iter().cloned().fold(f64::INFINITY, f64::min).max(0.01) / 1.5;
    let hi = all.iter().cloned().fold(0.0f64, f64::max).max(1.0) * 1.5;

    let root = BitMapBackend::new(path, (1600, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let (main, foot) = root.split_vertically(1070);
    let mut chart = ChartBuilder::on(&main)
        .caption(
            format!(
                "nicplug hot-plug latency per phase: {} runs per variant, {date}",
                r.runs
            ),
            ("sans-serif", 26),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(300)
        .build_cartesian_2d((lo..hi).log_scale(), -0.5f64..(n as f64 - 0.5))?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 0.01 && i >= 0.0 && (i as usize) < n {
                labels[n - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc("milliseconds (log scale)")
        .x_label_formatter(&|x| {
            if *x >= 1.0 {
                format!("{x:.0}")
            } else {
                format!("{x}")
            }
        })
        .label_style(("sans-serif", 17))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    for (v, name) in VARIANTS.iter().enumerate() {
        let color = COLORS[v];
        let offset = 0.25 - 0.25 * v as f64;
        let mut points = Vec::new();
        let mut medians = Vec::new();
        for (row, (_, values)) in rows.iter().enumerate() {
            let y = (n - 1 - row) as f64 + offset;
            for (k, x) in values[v].iter().enumerate() {
                let jitter = (((k * 37) % 11) as f64 - 5.0) / 5.0 * 0.07;
                points.push((x.max(lo), y + jitter));
            }
            if let Some(s) = summarize(&values[v]) {
                medians.push((s.p50.max(lo), y));
            }
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new(*p, 3, color.mix(0.55).filled())),
            )?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        for (x, y) in medians {
            chart.draw_series(LineSeries::new(
                vec![(x, y - 0.13), (x, y + 0.13)],
                ShapeStyle::from(&BLACK).stroke_width(3),
            ))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    foot.draw(&Text::new(
        "dots: every run (upper: nicplug, middle: floor, lower: script); black bar: median. \
         Plug rows start at 'pod interface exists' (RTM_NEWLINK in the pod netns), unplug rows at the VMI change.",
        (20, 5),
        ("sans-serif", 16),
    ))?;
    root.present()?;
    Ok(())
}
