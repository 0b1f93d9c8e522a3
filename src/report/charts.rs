//! The report's charts, drawn with plotters' SVG backend: scores per round,
//! cumulative task vs meta tokens, and the heatmap of each agent's mean
//! credit per round. No system fonts are needed: plotters lays text out
//! with its built-in metrics and the SVG leaves the glyphs to the viewer's
//! sans-serif font.

use super::RoundRow;
use crate::optimize::OptimizeResult;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// Colour of the "no credit" cells.
pub const MISSING: RGBColor = RGBColor(0xbd, 0xbd, 0xbd);

/// A chart that could not be drawn (a plotters error, as text).
#[derive(Debug, thiserror::Error)]
#[error("chart `{chart}`: {message}")]
pub struct ChartError {
    /// Which chart.
    pub chart: String,
    /// What plotters reported.
    pub message: String,
}

fn err<E: std::fmt::Display>(chart: &str) -> impl Fn(E) -> ChartError + '_ {
    move |e| ChartError {
        chart: chart.into(),
        message: e.to_string(),
    }
}

/// One line of a line chart.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// Line colour.
    pub color: RGBColor,
    /// Dashed line.
    pub dashed: bool,
    /// (x, y) points; non-finite ones are left out.
    pub points: Vec<(f64, f64)>,
}

/// Short tick label: `25k`, `1.5M`, `0.6`.
pub fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim_num(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim_num(v / 1e3))
    } else {
        trim_num(v)
    }
}

fn trim_num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// A line chart over integer x (rounds) with markers, grid and a legend at
/// `legend`. `y_zero` starts the y axis at 0.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_zero: bool,
    legend: SeriesLabelPosition,
) -> Result<String, ChartError> {
    let e = err(title);
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = finite.iter().flatten();
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if y_zero {
        y0 = y0.min(0.0);
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (if y_zero && y0 >= 0.0 { y0 } else { y0 - pad }, y1 + pad);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.2f64..x1 + 0.2, y0..y1)
            .map_err(&e)?;
        let rounds = x1 as usize;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .x_labels((rounds + 1).min(12))
            .x_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-9 && *v >= 0.0 {
                    format!("{}", v.round() as i64)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| fmt_tick(*v))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(&e)?;
        for (s, pts) in series.iter().zip(&finite) {
            let style = ShapeStyle {
                color: s.color.to_rgba(),
                filled: false,
                stroke_width: 2,
            };
            let legend =
                move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 22, y)], style);
            if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 7, 5, style))
                    .map_err(&e)?
                    .label(s.name)
                    .legend(legend);
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(&e)?
                    .label(s.name)
                    .legend(legend);
            }
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, style.filled())))
                .map_err(&e)?;
        }
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0x88, 0x88, 0x88))
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

/// Validation score of the combined best, and the incumbent's and best
/// candidate's block scores, per round.
pub fn scores_chart(summary: &OptimizeResult, rows: &[RoundRow]) -> Result<String, ChartError> {
    let mut validation = vec![(0.0, summary.initial_score)];
    validation.extend(rows.iter().map(|r| (r.round as f64, r.validation)));
    let incumbent = rows
        .iter()
        .filter_map(|r| r.incumbent_block.map(|v| (r.round as f64, v)))
        .collect();
    let best = rows
        .iter()
        .filter_map(|r| r.best_candidate_block.map(|v| (r.round as f64, v)))
        .collect();
    line_chart(
        "Scores per round",
        "round",
        "score",
        &[
            Series {
                name: "validation (combined best)",
                color: RGBColor(0x1b, 0x78, 0x37),
                dashed: false,
                points: validation,
            },
            Series {
                name: "block: incumbent",
                color: RGBColor(0x21, 0x66, 0xac),
                dashed: true,
                points: incumbent,
            },
            Series {
                name: "block: best candidate",
                color: RGBColor(0xd6, 0x60, 0x4d),
                dashed: false,
                points: best,
            },
        ],
        true,
        SeriesLabelPosition::LowerRight,
    )
}

/// Cumulative task and meta tokens per round.
pub fn tokens_chart(summary: &OptimizeResult, rows: &[RoundRow]) -> Result<String, ChartError> {
    // Before round 1 only the initial validation has been paid (task tokens).
    let initial = summary
        .validations
        .iter()
        .find(|v| v.round == 0)
        .map_or(0.0, |v| v.tokens as f64);
    let mut task = vec![(0.0, initial)];
    task.extend(
        rows.iter()
            .map(|r| (r.round as f64, r.cum_task_tokens as f64)),
    );
    let mut meta = vec![(0.0, 0.0)];
    meta.extend(
        rows.iter()
            .map(|r| (r.round as f64, r.cum_meta_tokens as f64)),
    );
    line_chart(
        "Cumulative tokens",
        "round",
        "tokens",
        &[
            Series {
                name: "task (rollouts, validation)",
                color: RGBColor(0x21, 0x66, 0xac),
                dashed: false,
                points: task,
            },
            Series {
                name: "meta (attribution, rewriting)",
                color: RGBColor(0xb2, 0x18, 0x2b),
                dashed: false,
                points: meta,
            },
        ],
        true,
        // Cumulative lines rise: the upper left stays free.
        SeriesLabelPosition::UpperLeft,
    )
}

/// Diverging colour for a credit in [-1, 1]: blue (−1) → light grey (0) → red (1).
pub fn credit_color(v: f64) -> RGBColor {
    let v = v.clamp(-1.0, 1.0);
    let mid = [247.0, 247.0, 247.0];
    let end = if v < 0.0 {
        [33.0, 102.0, 172.0]
    } else {
        [178.0, 24.0, 43.0]
    };
    let t = v.abs();
    let c = |i: usize| (mid[i] + (end[i] - mid[i]) * t).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

/// Heatmap of each agent's mean credit per round (grey = no credit), with
/// the values written in the cells when they fit and a colour bar.
pub fn credit_heatmap(agents: &[String], rows: &[RoundRow]) -> Result<String, ChartError> {
    let title = "Mean credit per agent and round";
    let e = err(title);
    let longest = agents.iter().map(|a| a.chars().count()).max().unwrap_or(4);
    let left = (longest as u32 * 7 + 24).clamp(70, 280);
    let n = rows.len().max(1);
    let cell_w = (560 / n as u32).clamp(8, 64);
    let cell_h = 34u32;
    let plot_w = cell_w * n as u32;
    let plot_h = cell_h * agents.len().max(1) as u32;
    let bar_w = 110u32;
    let w = (left + plot_w + bar_w + 30).max(420);
    let h = plot_h.max(160) + 44 + 64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (main, bar) = root.split_horizontally(w - bar_w);
        let na = agents.len().max(1) as i32;
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 22))
            .margin(10)
            .x_label_area_size(44)
            .y_label_area_size(left)
            .build_cartesian_2d(
                // plotters' integer ranges are inclusive: 0..=n-1 is n segments.
                (0..n as i32 - 1).into_segmented(),
                (0..na - 1).into_segmented(),
            )
            .map_err(&e)?;
        let round_of = |i: i32| rows.get(i as usize).map(|r| r.round);
        let label_every = n.div_ceil(20).max(1) as i32;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("round")
            .axis_desc_style(("sans-serif", 16))
            .x_labels(n)
            .y_labels(agents.len().max(1))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if i % label_every == 0 => {
                    round_of(*i).map(|r| r.to_string()).unwrap_or_default()
                }
                _ => String::new(),
            })
            .y_label_formatter(&|v| match v {
                // Top row = first agent.
                SegmentValue::CenterOf(i) => agents
                    .get((na - 1 - i) as usize)
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(&e)?;
        let mut cells = Vec::new();
        let mut texts = Vec::new();
        for (j, r) in rows.iter().enumerate() {
            for (i, a) in agents.iter().enumerate() {
                let (x, y) = (j as i32, na - 1 - i as i32);
                let mean = r.mean_credit.get(a).and_then(|m| m.0);
                let fill = mean.map_or(MISSING, credit_color);
                cells.push(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    fill.filled(),
                ));
                if cell_w >= 38 {
                    let (text, color) = match mean {
                        Some(m) if m.abs() > 0.6 => (format!("{m:.2}"), WHITE),
                        Some(m) => (format!("{m:.2}"), BLACK),
                        None => ("n/a".to_string(), BLACK),
                    };
                    texts.push(Text::new(
                        text,
                        (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                        ("sans-serif", 14).into_font().color(&color).pos(
                            plotters::style::text_anchor::Pos::new(
                                plotters::style::text_anchor::HPos::Center,
                                plotters::style::text_anchor::VPos::Center,
                            ),
                        ),
                    ));
                }
            }
        }
        chart.draw_series(cells).map_err(&e)?;
        chart.draw_series(texts).map_err(&e)?;
        // Colour bar: +1 at the top, −1 at the bottom, and the n/a swatch.
        let (top, bar_h) = (44i32, (h as i32 - 44 - 64).clamp(100, 200));
        let steps = 40;
        for k in 0..steps {
            let v = 1.0 - 2.0 * (k as f64 + 0.5) / steps as f64;
            let y = top + k * bar_h / steps;
            let y2 = top + (k + 1) * bar_h / steps;
            bar.draw(&Rectangle::new(
                [(16, y), (32, y2)],
                credit_color(v).filled(),
            ))
            .map_err(&e)?;
        }
        bar.draw(&Rectangle::new(
            [(16, top), (32, top + bar_h)],
            RGBColor(0x55, 0x55, 0x55),
        ))
        .map_err(&e)?;
        let font = ("sans-serif", 14).into_font();
        bar.draw(&Text::new("credit", (12, top - 16), font.clone()))
            .map_err(&e)?;
        for (v, frac) in [
            (1.0, 0.0),
            (0.5, 0.25),
            (0.0, 0.5),
            (-0.5, 0.75),
            (-1.0, 1.0),
        ] {
            let y = top + (frac * bar_h as f64) as i32 - 5;
            bar.draw(&Text::new(trim_num(v), (38, y), font.clone()))
                .map_err(&e)?;
        }
        let sy = top + bar_h + 12;
        bar.draw(&Rectangle::new([(16, sy), (32, sy + 12)], MISSING.filled()))
            .map_err(&e)?;
        bar.draw(&Text::new("no credit", (38, sy), font))
            .map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(round: usize, credits: &[(&str, Option<f64>)]) -> RoundRow {
        RoundRow {
            round,
            validation: 0.5,
            validation_p: None,
            incumbent_block: Some(0.4),
            best_candidate_block: None,
            configs: 1,
            task_tokens: 10,
            meta_tokens: 20,
            cum_task_tokens: 10 * round as u64,
            cum_meta_tokens: 20 * round as u64,
            attribution_failures: 0,
            rejections: 0,
            mean_credit: credits
                .iter()
                .map(|(a, m)| (a.to_string(), (*m, usize::from(m.is_some()))))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    /// Whether the SVG holds a text element with exactly `t`.
    fn has_text(svg: &str, t: &str) -> bool {
        svg.contains(&format!(">\n{t}\n</text>"))
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(fmt_tick(0.6000000000000001), "0.6");
        assert_eq!(fmt_tick(25_000.0), "25k");
        assert_eq!(fmt_tick(5_000.0), "5k");
        assert_eq!(fmt_tick(500.0), "500");
        assert_eq!(fmt_tick(1_500_000.0), "1.5M");
        assert_eq!(fmt_tick(-0.0), "0");
    }

    #[test]
    fn colors_span_the_diverging_scale() {
        assert_eq!(credit_color(-1.0), RGBColor(0x21, 0x66, 0xac));
        assert_eq!(credit_color(0.0), RGBColor(0xf7, 0xf7, 0xf7));
        assert_eq!(credit_color(1.0), RGBColor(0xb2, 0x18, 0x2b));
        assert_eq!(credit_color(7.0), credit_color(1.0));
    }

    #[test]
    fn heatmap_has_one_cell_per_agent_and_round_and_marks_missing() {
        let agents: Vec<String> = ["planner", "a_very_long_agent_name_for_layout", "x&y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let rows: Vec<RoundRow> = (1..=30)
            .map(|r| {
                let v = (r as f64 / 15.0) - 1.0;
                row(
                    r,
                    &[
                        ("planner", Some(v)),
                        ("a_very_long_agent_name_for_layout", Some(-v)),
                        ("x&y", if r % 7 == 0 { None } else { Some(0.1) }),
                    ],
                )
            })
            .collect();
        let svg = credit_heatmap(&agents, &rows).unwrap();
        if let Ok(p) = std::env::var("CANTANTE_REPORT_DUMP") {
            let _ = std::fs::write(p, &svg);
        }
        // 4 missing cells + the legend swatch.
        let missing = format!("fill=\"{}\"", hex(MISSING));
        assert_eq!(svg.matches(&missing).count(), 5, "{svg}");
        // Planner's last cell is +1 (dark red), the long agent's -1 (blue).
        assert!(svg.contains(&format!("fill=\"{}\"", hex(credit_color(1.0)))));
        assert!(svg.contains(&format!("fill=\"{}\"", hex(credit_color(-1.0)))));
        assert!(has_text(&svg, "x&amp;y") && !svg.contains("x&y"));
        assert!(has_text(&svg, "planner") && has_text(&svg, "round"));
        // Round labels thinned to every 2nd of 30 rounds.
        assert!(has_text(&svg, "29") && !has_text(&svg, "28"));
    }

    #[test]
    fn line_chart_leaves_out_nan_and_draws_markers() {
        let svg = line_chart(
            "t",
            "round",
            "score",
            &[Series {
                name: "s",
                color: BLACK,
                dashed: false,
                points: vec![(1.0, f64::NAN), (2.0, 0.5)],
            }],
            true,
            SeriesLabelPosition::LowerRight,
        )
        .unwrap();
        assert_eq!(svg.matches("<circle").count(), 1, "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(has_text(&svg, "s") && has_text(&svg, "round"));
    }
}
