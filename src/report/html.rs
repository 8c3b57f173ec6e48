//! The report page: one HTML file with the Vega libraries inlined, so it opens offline.

use std::fmt::Write as _;

use serde_json::Value;

const VEGA: &str = include_str!("../../vendor/vega/vega.min.js");
const VEGA_LITE: &str = include_str!("../../vendor/vega/vega-lite.min.js");
const VEGA_EMBED: &str = include_str!("../../vendor/vega/vega-embed.min.js");

const CDN: [&str; 3] = [
    "https://cdn.jsdelivr.net/npm/vega@5.33.1/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@4.17.0/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6.29.0/build/vega-embed.min.js",
];

/// How the page gets the Vega libraries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripts {
    Inline,
    Cdn,
}

/// Escape text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON that is safe inside a `<script>` element: `<`, `>` and `&` (and the JS line
/// separators) become `\u` escapes, which JSON parsers read back unchanged.
pub fn script_json(v: &Value) -> String {
    let s = serde_json::to_string(v).expect("JSON values serialize");
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// A section of the page: a heading, then charts and HTML blocks in order.
pub struct Section {
    pub title: String,
    pub blocks: Vec<Block>,
}

pub enum Block {
    Chart(Value),
    /// Trusted HTML built by this crate (all user text already escaped).
    Html(String),
}

pub fn page(title: &str, subtitle: &str, sections: &[Section], scripts: Scripts) -> String {
    let mut charts: Vec<&Value> = Vec::new();
    let mut body = String::new();
    for s in sections {
        let _ = writeln!(body, "<section><h2>{}</h2>", escape(&s.title));
        for b in &s.blocks {
            match b {
                Block::Chart(spec) => {
                    let _ = writeln!(
                        body,
                        "<div class=\"chart\" id=\"chart-{}\"></div>",
                        charts.len()
                    );
                    charts.push(spec);
                }
                Block::Html(h) => {
                    body.push_str(h);
                    body.push('\n');
                }
            }
        }
        body.push_str("</section>\n");
    }
    let specs = Value::Array(charts.into_iter().cloned().collect());
    let libs = match scripts {
        Scripts::Inline => [VEGA, VEGA_LITE, VEGA_EMBED]
            .iter()
            .map(|src| format!("<script>{src}</script>"))
            .collect::<Vec<_>>()
            .join("\n"),
        Scripts::Cdn => CDN
            .iter()
            .map(|u| format!("<script src=\"{u}\"></script>"))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1d2230; }}
h1 {{ margin-bottom: .2rem; }} .sub {{ color: #5b6275; margin-top: 0; }}
section {{ margin: 2rem 0; }} h2 {{ border-bottom: 1px solid #dde1ea; padding-bottom: .3rem; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .5rem 0; }}
th, td {{ padding: .25rem .6rem; border-bottom: 1px solid #eceef3; text-align: right; vertical-align: top; }}
th {{ background: #f5f6fa; position: sticky; top: 0; }} td.l, th.l {{ text-align: left; }}
.chart {{ margin: 1rem 0; }} .note {{ color: #5b6275; }} .warn {{ color: #a33b00; }}
code {{ background: #f3f4f8; padding: 0 .2rem; border-radius: 3px; }}
div.text {{ max-width: 44rem; max-height: 10rem; overflow: auto; white-space: pre-wrap; font-size: 12px; }}
details {{ margin: .4rem 0; }} .scroll {{ overflow-x: auto; }} td code {{ white-space: nowrap; }} summary {{ cursor: pointer; }}
</style>
{libs}
</head>
<body>
<h1>{title}</h1>
<p class="sub">{subtitle}</p>
{body}
<script type="application/json" id="pipeline-specs">{specs}</script>
<script>
(function () {{
  var specs = JSON.parse(document.getElementById("pipeline-specs").textContent);
  var done = specs.map(function (spec, i) {{
    return vegaEmbed("#chart-" + i, spec, {{ renderer: "svg", actions: false }});
  }});
  Promise.all(done).then(function () {{
    document.body.setAttribute("data-charts-rendered", String(specs.length));
  }}, function (err) {{
    document.body.setAttribute("data-charts-error", String(err));
    console.error(err);
  }});
}})();
</script>
</body>
</html>
"##,
        title = escape(title),
        subtitle = escape(subtitle),
        specs = script_json(&specs),
    )
}

/// An HTML table; `cells` are already-escaped HTML, `left` marks left-aligned columns.
pub fn table(head: &[&str], rows: &[Vec<String>], left: &[usize]) -> String {
    let mut s = String::from("<div class=\"scroll\"><table><thead><tr>");
    for (i, h) in head.iter().enumerate() {
        let class = if left.contains(&i) {
            " class=\"l\""
        } else {
            ""
        };
        let _ = write!(s, "<th{class}>{}</th>", escape(h));
    }
    s.push_str("</tr></thead><tbody>\n");
    for r in rows {
        s.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            let class = if left.contains(&i) {
                " class=\"l\""
            } else {
                ""
            };
            let _ = write!(s, "<td{class}>{c}</td>");
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table></div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_json_cannot_close_the_script() {
        let v = serde_json::json!({"t": "</script><script>alert(1)</script> & \u{2028}"});
        let s = script_json(&v);
        assert!(!s.contains('<') && !s.contains('>') && !s.contains('&'));
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn escape_covers_markup() {
        assert_eq!(
            escape("<b a=\"x\">&'"),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
