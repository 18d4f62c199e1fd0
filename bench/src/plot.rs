//! A small SVG line-chart writer for benchmark results: no fonts, no
//! dependencies, one `<svg>` with one panel per chart stacked vertically.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, drawn in the given order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One panel.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the panel.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis (values ≤ 0 are skipped).
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const WIDTH: f64 = 760.0;
const PANEL: f64 = 320.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;
const COLORS: [&str; 9] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f",
];

/// Escapes text for SVG.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Round tick values (1, 2, 5 × 10^k) covering `[lo, hi]`, about `n` of them.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo || n == 0 {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut ticks = Vec::new();
    let mut v = (lo / step).ceil() * step;
    // Bounded: at most about n + 2 steps fit in [lo, hi].
    while v <= hi + step * 1e-9 && ticks.len() < 4 * n + 4 {
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    ticks
}

/// Tick values for a log axis spanning `[10^lo, 10^hi]`: the decades, or
/// round linear steps when fewer than two decades fall inside.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi < lo {
        return Vec::new();
    }
    let inside = |v: f64| v.log10() >= lo - 1e-9 && v.log10() <= hi + 1e-9;
    let decades: Vec<f64> = (lo.floor() as i32..=hi.ceil() as i32)
        .map(|d| 10f64.powi(d))
        .filter(|v| inside(*v))
        .collect();
    if decades.len() >= 2 {
        return decades;
    }
    nice_ticks(10f64.powf(lo), 10f64.powf(hi), 5)
        .into_iter()
        .filter(|v| *v > 0.0 && inside(*v))
        .collect()
}

/// Formats an axis value compactly: 1.5k, 2M, 0.25.
pub fn compact(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e3 {
        trim(format!("{:.2}", v / 1e3)) + "k"
    } else if a >= 1.0 || a == 0.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.4}"))
    }
}

fn bounds(chart: &Chart) -> Option<(f64, f64, f64, f64)> {
    let pts = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_x || *x > 0.0));
    let mut b: Option<(f64, f64, f64, f64)> = None;
    for (x, y) in pts {
        let x = if chart.log_x { x.log10() } else { x };
        b = Some(match b {
            None => (x, x, y, y),
            Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
        });
    }
    b.map(|(x0, x1, y0, y1)| {
        let (x0, x1) = if x1 > x0 {
            (x0, x1)
        } else {
            (x0 - 1.0, x1 + 1.0)
        };
        // Counts and rates start at zero; keep y from 0 unless it goes negative.
        let y0 = y0.min(0.0);
        let y1 = if y1 > y0 { y1 * 1.05 } else { y0 + 1.0 };
        (x0, x1, y0, y1)
    })
}

/// Renders the charts as one SVG document.
pub fn render(charts: &[Chart]) -> String {
    let height = PANEL * charts.len().max(1) as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, chart) in charts.iter().enumerate() {
        panel(&mut svg, chart, PANEL * i as f64);
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, chart: &Chart, top: f64) {
    let (x_left, x_right) = (LEFT, WIDTH - RIGHT);
    let (y_top, y_bottom) = (top + TOP, top + PANEL - BOTTOM);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        LEFT,
        top + 20.0,
        escape(&chart.title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x_left}" y="{y_top}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        x_right - x_left,
        y_bottom - y_top
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (x_left + x_right) / 2.0,
        y_bottom + 34.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        (y_top + y_bottom) / 2.0,
        escape(&chart.y_label)
    );
    let Some((x0, x1, y0, y1)) = bounds(chart) else {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#,
            (x_left + x_right) / 2.0,
            (y_top + y_bottom) / 2.0
        );
        return;
    };
    let sx = |x: f64| x_left + (x - x0) / (x1 - x0) * (x_right - x_left);
    let sy = |y: f64| y_bottom - (y - y0) / (y1 - y0) * (y_bottom - y_top);
    // Grid and tick labels.
    let x_ticks: Vec<(f64, String)> = if chart.log_x {
        log_ticks(x0, x1)
            .into_iter()
            .map(|v| (v.log10(), compact(v)))
            .collect()
    } else {
        nice_ticks(x0, x1, 8)
            .into_iter()
            .map(|v| (v, compact(v)))
            .collect()
    };
    for (v, label) in x_ticks {
        let x = sx(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{y_top}" x2="{x:.1}" y2="{y_bottom}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y_bottom + 16.0,
            escape(&label)
        );
    }
    for v in nice_ticks(y0, y1, 6) {
        let y = sy(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x_left}" y1="{y:.1}" x2="{x_right}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x_left - 6.0,
            y + 4.0,
            escape(&compact(v))
        );
    }
    for (i, series) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_x || *x > 0.0))
            .map(|&(x, y)| {
                let x = if chart.log_x { x.log10() } else { x };
                format!("{:.1},{:.1}", sx(x), sy(y))
            })
            .collect();
        if points.len() == 1 {
            let (x, y) = points[0].split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
        } else if !points.is_empty() {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
        }
        let ly = y_top + 8.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{2}" y="{3}">{4}</text>"#,
            x_right + 10.0,
            x_right + 28.0,
            x_right + 32.0,
            ly + 4.0,
            escape(&series.label)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>, log_x: bool) -> Chart {
        Chart {
            title: "deliveries <per> second & more".into(),
            x_label: "seconds".into(),
            y_label: "deliveries/s".into(),
            log_x,
            series,
        }
    }

    #[test]
    fn renders_lines_legends_and_escaped_text() {
        let svg = render(&[chart(
            vec![
                Series {
                    label: "rim \"batched\"".into(),
                    points: vec![(0.0, 10.0), (1.0, 20.0), (2.0, 15.0)],
                },
                Series {
                    label: "baseline".into(),
                    points: vec![(0.0, 12.0), (f64::NAN, 3.0), (2.0, 18.0)],
                },
            ],
            false,
        )]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("rim &quot;batched&quot;"));
        assert!(svg.contains("deliveries &lt;per&gt; second &amp; more"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // The NaN point is dropped: the second line has two points.
        let second = svg
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .nth(1)
            .unwrap();
        assert_eq!(second.matches(',').count(), 2);
    }

    #[test]
    fn empty_and_single_point_charts_do_not_break() {
        let svg = render(&[
            chart(vec![], false),
            chart(
                vec![Series {
                    label: "one".into(),
                    points: vec![(5.0, 5.0)],
                }],
                true,
            ),
        ]);
        assert!(svg.contains("no data"));
        assert!(svg.contains("<circle"));
        assert!(svg.contains(r#"height="640""#));
    }

    #[test]
    fn log_axes_skip_non_positive_x_and_label_decades() {
        let svg = render(&[chart(
            vec![Series {
                label: "cdf".into(),
                points: vec![(0.0, 0.0), (0.1, 10.0), (1.0, 50.0), (100.0, 100.0)],
            }],
            true,
        )]);
        assert!(svg.contains(">0.1<") && svg.contains(">1<") && svg.contains(">100<"));
    }

    #[test]
    fn log_ticks_use_decades_or_round_steps() {
        assert_eq!(log_ticks(-1.0, 2.0), vec![0.1, 1.0, 10.0, 100.0]);
        let narrow = log_ticks(250f64.log10(), 850f64.log10());
        assert_eq!(narrow, vec![400.0, 600.0, 800.0]);
        let t = log_ticks(150f64.log10(), 2500f64.log10());
        assert_eq!(t, vec![500.0, 1000.0, 1500.0, 2000.0, 2500.0]);
        assert!(log_ticks(2.0, 1.0).is_empty());
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(3.0, 97.0, 5);
        assert_eq!(t, vec![20.0, 40.0, 60.0, 80.0]);
        assert_eq!(nice_ticks(1.0, 1.0, 5), vec![1.0]);
        assert_eq!(compact(1500.0), "1.5k");
        assert_eq!(compact(2_000_000.0), "2M");
        assert_eq!(compact(0.25), "0.25");
        assert_eq!(compact(0.0), "0");
    }
}
