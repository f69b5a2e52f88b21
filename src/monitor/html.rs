//! The report as a self-contained HTML page: target against served, as
//! inline SVG bars. No scripts, fonts or styles from elsewhere.

use super::report::{Report, Status, WindowKind, WindowReport};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn status_color(s: Status) -> &'static str {
    match s {
        Status::Ok => "#2e7d32",
        Status::Warn => "#f9a825",
        Status::Alert => "#c62828",
        Status::InsufficientData => "#757575",
    }
}

fn status_text(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Warn => "warn",
        Status::Alert => "alert",
        Status::InsufficientData => "insufficient data",
    }
}

/// Three bars per value: target, drawn, detected (with its 95% interval).
fn chart(values: &[String], w: &WindowReport) -> String {
    let row = 64;
    let width = 520;
    let label = 110;
    let scale = (width - label - 60) as f64;
    let height = row * values.len() + 24;
    let mut svg = format!(r#"<svg width="{width}" height="{height}" role="img">"#);
    for (i, v) in values.iter().enumerate() {
        let y = 8 + i * row;
        svg += &format!(
            r#"<text x="0" y="{}" font-size="13">{}</text>"#,
            y + 26,
            escape(v)
        );
        let bars = [
            (
                "target",
                w.target.get(v).copied().unwrap_or(0.0),
                "#9e9e9e",
                None,
            ),
            (
                "drawn",
                w.drawn.get(v).map_or(0.0, |p| p.p),
                "#1565c0",
                None,
            ),
            (
                "served",
                w.detected.get(v).map_or(0.0, |p| p.p),
                "#2e7d32",
                w.detected.get(v).map(|p| (p.low, p.high)),
            ),
        ];
        for (j, (name, p, color, ci)) in bars.into_iter().enumerate() {
            let by = y + j * 18;
            let bw = (p * scale).round() as usize;
            svg += &format!(
                r#"<rect x="{label}" y="{by}" width="{bw}" height="14" fill="{color}"><title>{name}: {:.1}%</title></rect><text x="{}" y="{}" font-size="11">{name} {:.1}%</text>"#,
                p * 100.0,
                label + bw + 4,
                by + 11,
                p * 100.0
            );
            if let Some((lo, hi)) = ci {
                let (x0, x1) = (label as f64 + lo * scale, label as f64 + hi * scale);
                svg += &format!(
                    r#"<line x1="{x0:.1}" x2="{x1:.1}" y1="{}" y2="{}" stroke="black" stroke-width="1.5"/>"#,
                    by + 7,
                    by + 7
                );
            }
        }
    }
    svg + "</svg>"
}

fn window_block(title: &str, values: &[String], w: &WindowReport) -> String {
    let m = &w.detected_metrics;
    let consistency = w
        .consistency
        .map_or("–".to_string(), |c| format!("{:.1}%", c * 100.0));
    format!(
        r#"<div class="card"><h3>{} <span class="status" style="background:{}">{}</span></h3>
<p>{} rounds · {} none · {} ambiguous · consistency {} · MAE {:.3} · KL {:.4} · TV {:.3} · JS {:.3} · χ² {:.2} (df {}, p {:.4})</p>{}</div>"#,
        escape(title),
        status_color(w.status),
        status_text(w.status),
        w.n,
        w.detected_none,
        w.detected_ambiguous,
        consistency,
        m.mae,
        m.kl,
        m.total_variation,
        m.js_distance,
        m.chi_square,
        m.chi_square_df,
        m.chi_square_p,
        chart(values, w)
    )
}

/// Whose rounds the page shows, in fleet mode.
fn fleet_line(report: &Report) -> String {
    let Some(fleet) = &report.fleet else {
        return String::new();
    };
    let replicas: Vec<String> = fleet
        .replicas
        .iter()
        .map(|r| format!("{} ({:.0} s ago)", escape(&r.id), r.seconds_ago))
        .collect();
    match &fleet.missing {
        Some(missing) => format!(
            "<p><b>Degraded</b> (replica {}): {}</p>",
            escape(&fleet.replica),
            escape(missing)
        ),
        None => format!(
            "<p>Fleet of {} replicas: {}</p>",
            replicas.len(),
            replicas.join(", ")
        ),
    }
}

pub fn render(report: &Report) -> String {
    let mut body = fleet_line(report);
    if report.adapters.is_empty() {
        body += "<p>No steered rounds recorded yet.</p>";
    }
    for a in &report.adapters {
        body += &format!("<h2>{} — {}</h2>", escape(&a.adapter), escape(&a.attribute));
        for w in &a.aggregate {
            let kind = match w.window {
                WindowKind::Count => format!("all contexts, last {} rounds", report.window_rounds),
                WindowKind::Time => format!("all contexts, last {} s", report.window_seconds),
            };
            body += &window_block(&kind, &a.values, w);
        }
        for (ctx, windows) in &a.contexts {
            if let Some(w) = windows.first() {
                body += &window_block(&format!("context: {ctx}"), &a.values, w);
            }
        }
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>steerling — distribution report</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#212121}}.card{{border:1px solid #ddd;border-radius:6px;padding:8px 16px;margin:12px 0;display:inline-block;vertical-align:top;width:560px}}.status{{color:#fff;border-radius:4px;padding:2px 8px;font-size:13px}}p{{font-size:13px}}</style></head>
<body><h1>Distribution report</h1><p>Target (grey), drawn (blue) and served — detected in the text (green, with its 95% interval).</p>{body}</body></html>"#
    )
}
