//! Two small charts as standalone SVG: lines over rounds, and a scatter of
//! served against target shares.

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 50.0;
const TOP: f64 = 40.0;
const RIGHT: f64 = 130.0;
const COLORS: &[&str] = &[
    "#888888", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
];

fn x_px(x: f64, max: f64) -> f64 {
    LEFT + x / max * (W - LEFT - RIGHT)
}

fn y_px(y: f64, max: f64) -> f64 {
    H - BOTTOM - y / max * (H - BOTTOM - TOP)
}

fn frame(title: &str, x_label: &str, y_label: &str, x_max: f64, y_max: f64) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"22\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for i in 0..=4 {
        let (fx, fy) = (x_max * i as f64 / 4.0, y_max * i as f64 / 4.0);
        let (px, py) = (x_px(fx, x_max), y_px(fy, y_max));
        s += &format!(
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            short(fy),
            H - BOTTOM + 16.0,
            short(fx)
        );
    }
    s += &format!(
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label),
        (TOP + H - BOTTOM) / 2.0,
        escape(y_label)
    );
    s
}

/// One line per series over x = 1..=len.
pub fn convergence(series: &[(String, Vec<Option<f64>>)], x_label: &str, y_label: &str) -> String {
    let x_max = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let y_top = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    let y_max = if y_top > 0.0 { y_top * 1.1 } else { 1.0 };
    let mut s = frame(
        "Convergence: served shares vs target",
        x_label,
        y_label,
        x_max,
        y_max,
    );
    for (i, (name, values)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter_map(|(r, v)| {
                v.map(|v| format!("{:.1},{:.1}", x_px((r + 1) as f64, x_max), y_px(v, y_max)))
            })
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>\n",
            points.join(" "),
            W - RIGHT + 10.0,
            TOP + 18.0 * (i + 1) as f64,
            escape(name)
        );
    }
    s + "</svg>\n"
}

/// Points (target, served) in [0, 1]², with the diagonal.
pub fn scatter(points: &[(f64, f64)], title: &str) -> String {
    let mut s = frame(title, "target share", "served share", 1.0, 1.0);
    s += &format!(
        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\" stroke-dasharray=\"4 4\"/>\n",
        x_px(0.0, 1.0),
        y_px(0.0, 1.0),
        x_px(1.0, 1.0),
        y_px(1.0, 1.0)
    );
    for (x, y) in points {
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#1f77b4\" fill-opacity=\"0.7\"/>\n",
            x_px(*x, 1.0),
            y_px(*y, 1.0)
        );
    }
    s + "</svg>\n"
}

fn short(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_place_points_inside_the_frame() {
        let svg = convergence(
            &[("prior".into(), vec![Some(0.2), None, Some(0.1)])],
            "r",
            "mae",
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        // x = 1 → LEFT + 1/3 of the plot width; y = 0.2 is the top value.
        let x1 = x_px(1.0, 3.0);
        assert!(svg.contains(&format!("{x1:.1},{:.1}", y_px(0.2, 0.22))));
        let svg = scatter(&[(0.5, 0.5)], "a < b");
        assert!(svg.contains("a &lt; b"));
        assert!(svg.contains(&format!("cx=\"{:.1}\"", x_px(0.5, 1.0))));
    }
}
