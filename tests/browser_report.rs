//! The report in a real browser: headless Chromium opens it from `file://` with no network,
//! every chart must render, the console must show no uncaught error, and review text that
//! holds markup must show as text and never run. Without a headless Chromium the browser
//! test is listed as ignored, by name (`scripts/setup` installs one); under `CI=true` it
//! fails.

mod common;

use std::path::Path;
use std::process::{Command, ExitCode};

use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mut trials = common::trials_needing(
        "a headless Chromium",
        chromium().err(),
        vec![
            (
                "report_renders_offline_and_shows_markup_as_text",
                report_renders_offline_and_shows_markup_as_text,
            ),
            (
                "retrieval_and_calibration_charts_render",
                retrieval_and_calibration_charts_render,
            ),
            (
                "a_large_grid_opens_with_its_summary_and_heatmap_and_its_tables_sort_and_filter",
                a_large_grid_opens_with_its_summary_and_heatmap_and_its_tables_sort_and_filter,
            ),
        ],
    );
    trials.push(Trial::test(
        "cdn_mode_links_the_libraries_instead_of_inlining_them",
        cdn_mode_links_the_libraries_instead_of_inlining_them,
    ));
    libtest_mimic::run(&args, trials).exit_code()
}

const INJECTED: &str = "</script><script>document.body.setAttribute('data-pwned','1')</script><img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">";

fn chromium() -> Result<String, String> {
    for name in ["chromium-headless-shell", "chromium", "chromium-browser"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(name.to_string());
        }
    }
    Err("no chromium-headless-shell, chromium or chromium-browser on PATH (scripts/setup installs Debian's chromium-headless-shell)".into())
}

/// Dump the DOM after scripts ran; returns (dom, browser log).
fn render(browser: &str, page: &Path) -> (String, String) {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=8000",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
    ];
    let user_dir = tempfile::tempdir().unwrap();
    let user_arg = format!("--user-data-dir={}", user_dir.path().display());
    // No network at all where a network namespace can be made; the page needs none.
    let isolated = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if isolated {
        let mut c = Command::new("unshare");
        c.args(["-n", browser]);
        c
    } else {
        Command::new(browser)
    };
    let out = cmd.args(args).arg(user_arg).arg(&url).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn report_renders_offline_and_shows_markup_as_text() -> Result<(), Failed> {
    let browser = chromium()?;
    let p = common::Project::new();
    // Every review carries markup that would run if it were not escaped.
    let mut jsonl = String::new();
    for i in 0..30 {
        let label = i % 2;
        let text = format!("Review {i} {INJECTED} the end.");
        jsonl.push_str(
            &serde_json::json!({"id": format!("r{i}"), "text": text, "label": label}).to_string(),
        );
        jsonl.push('\n');
    }
    p.write("data/reviews.jsonl", &jsonl);
    let spec = common::SPEC.replace(
        "name: t\n",
        "name: t\ndescription: \"<b onmouseover=alert(1)>bold</b> & <script>document.body.setAttribute('data-pwned','3')</script>\"\n",
    );
    p.write("spec.yaml", &spec);
    p.run();
    let page = p.path("reports/t/index.html");
    let (dom, log) = render(&browser, &page);

    let rendered = dom
        .split("data-charts-rendered=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse::<usize>().ok());
    let error = dom
        .split("data-charts-error=\"")
        .nth(1)
        .and_then(|s| s.split('"').next());
    assert_eq!(
        rendered,
        Some(6),
        "every embed resolved (error: {error:?})\n{log}"
    );
    let svgs = dom.matches("class=\"marks\"").count();
    assert_eq!(svgs, 6, "one rendered SVG per chart");
    let after_head = dom.rsplit("</head>").next().unwrap_or("");
    let body_tag = after_head
        .split("<body")
        .nth(1)
        .and_then(|s| s.split('>').next())
        .unwrap_or("");
    assert!(body_tag.contains("data-charts-rendered"), "{body_tag}");
    assert!(
        !body_tag.contains("data-pwned"),
        "injected markup ran: <body{body_tag}>"
    );
    assert!(
        !dom.contains("<img src=\"x\""),
        "no live image element from review text"
    );
    assert!(
        dom.contains("&lt;/script&gt;&lt;script&gt;document.body.setAttribute"),
        "the review shows as text"
    );
    assert!(
        dom.contains("&lt;b onmouseover=alert(1)&gt;bold&lt;/b&gt;"),
        "the description shows as text"
    );
    let uncaught: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .filter(|l| l.contains("Uncaught") || l.contains(":ERROR:CONSOLE"))
        .collect();
    assert!(
        uncaught.is_empty(),
        "console errors from the report:\n{}",
        uncaught.join("\n")
    );
    Ok(())
}

fn cdn_mode_links_the_libraries_instead_of_inlining_them() -> Result<(), Failed> {
    let p = common::Project::new();
    p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet", "--cdn"]);
    let html = p.read("reports/t/index.html");
    assert!(html.contains("https://cdn.jsdelivr.net/npm/vega@5.33.1/build/vega.min.js"));
    assert!(html.len() < 100_000, "{} bytes", html.len());
    p.run_ok(&["report", "spec.yaml", "--backend", "fake", "--quiet"]);
    assert!(
        p.read("reports/t/index.html").len() > 800_000,
        "inlined by default"
    );
    Ok(())
}

/// The charts of retrieved examples, votes and calibrated cells render too.
fn retrieval_and_calibration_charts_render() -> Result<(), Failed> {
    let browser = chromium()?;
    let p = common::knn_project();
    p.run();
    let (dom, log) = render(&browser, &p.path("reports/t/index.html"));
    let rendered = dom
        .split("data-charts-rendered=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse::<usize>().ok());
    // accuracy, cost, predicted labels, confusion, reliability, before/after calibration
    assert_eq!(rendered, Some(6), "{log}");
    assert_eq!(dom.matches("class=\"marks\"").count(), 6);
    assert!(dom.contains("Calibrated cells") && dom.contains("leak guard left out"));
    Ok(())
}

/// A grid of 20 cells: two models × two prompts × (a log-likelihood cell and four sampled
/// ones).
const GRID_SPEC: &str = r#"name: grid
dataset:
  path: data/reviews.jsonl
  id: id
  text: text
  label: label
  labels: {0: negative, 1: positive}
models:
  - id: fake-a
    gguf: models/a.gguf
    n_ctx: 512
    parameters: 100000000
  - id: fake-b-with-a-long-name-for-the-legend
    gguf: models/b.gguf
    n_ctx: 512
    parameters: 300000000
prompts:
  - id: p1
    user: {file: prompts/p1.j2}
  - id: p2
    system: "You judge reviews."
    user: {file: prompts/p2.j2}
methods:
  - id: gen
    kind: generate
    max_tokens: 4
  - id: ll
    kind: loglik
sampling:
  temperature: [0.2, 0.8]
  seed: [1, 2]
"#;

/// The page as the browser leaves it at `width` pixels, after `script` ran on it (injected
/// before `</body>`, after the page's own scripts).
fn render_at(browser: &str, page: &Path, width: u32, script: &str) -> String {
    let html = std::fs::read_to_string(page).unwrap();
    // The page's own `</body>`, the last one (the inlined libraries hold the text too).
    let end = html.rfind("</body>").expect("a body");
    let with = format!("{}<script>{script}</script>{}", &html[..end], &html[end..]);
    let copy = page.with_file_name("probe.html");
    std::fs::write(&copy, with).unwrap();
    let url = format!("file://{}", copy.canonicalize().unwrap().display());
    let user_dir = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=8000",
            &format!("--window-size={width},1600"),
            &format!("--user-data-dir={}", user_dir.path().display()),
            "--dump-dom",
            &url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of the page at `width` pixels, for a person to look at; its width as PNG
/// says.
fn screenshot(browser: &str, page: &Path, width: u32, out: &Path) -> u32 {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let user_dir = tempfile::tempdir().unwrap();
    let status = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=8000",
            &format!("--window-size={width},2400"),
            &format!("--user-data-dir={}", user_dir.path().display()),
            &format!("--screenshot={}", out.display()),
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let png = std::fs::read(out).unwrap();
    assert_eq!(&png[1..4], b"PNG", "{} is a PNG", out.display());
    u32::from_be_bytes([png[16], png[17], png[18], png[19]])
}

fn attribute<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    dom.split(&format!("{name}=\""))
        .nth(1)
        .and_then(|s| s.split('"').next())
}

fn a_large_grid_opens_with_its_summary_and_heatmap_and_its_tables_sort_and_filter()
-> Result<(), Failed> {
    let browser = chromium()?;
    let p = common::Project::new();
    pipeline::model::write_fake_gguf(&p.path("models/b.gguf"), b"fake model b").unwrap();
    p.write("spec.yaml", GRID_SPEC);
    p.run_ok(&["run", "spec.yaml", "--backend", "fake", "--quiet"]);
    let page = p.path("reports/grid/index.html");
    let html = p.read("reports/grid/index.html");
    // The summary comes first: each model's best cell with its honest estimate, then the
    // key Findings, the rest folded, then the heatmap; the long tables after.
    let at = |s: &str| html.find(s).unwrap_or_else(|| panic!("no {s}"));
    assert!(at("id=\"summary\"") < at("id=\"more-findings\""));
    assert!(at("id=\"more-findings\"") < at("<h2>Accuracy and cost</h2>"));
    assert!(html.contains("honest estimate") && html.contains("GFLOP a row"));

    let probe = r#"
      var t = document.querySelectorAll("table.sortable")[1];
      var th = Array.prototype.find.call(t.querySelectorAll("th"), function (h) { return h.textContent === "accuracy"; });
      var col = Array.prototype.indexOf.call(th.parentNode.children, th);
      th.click();
      var values = Array.prototype.map.call(t.tBodies[0].rows, function (r) { return parseFloat(r.cells[col].textContent); });
      var sorted = values.every(function (v, i) { return i === 0 || values[i - 1] <= v; });
      var sel = t.parentNode.previousSibling.querySelector("select[data-facet=model]");
      sel.value = "fake-a"; sel.dispatchEvent(new Event("change"));
      var shown = Array.prototype.filter.call(t.tBodies[0].rows, function (r) { return !r.hidden; }).length;
      var texts = Array.prototype.map.call(document.querySelectorAll("svg text"), function (x) { return x.textContent; });
      var cut = texts.filter(function (x) { return x.indexOf("\u2026") >= 0; });
      document.body.setAttribute("data-sorted", String(sorted) + ":" + th.getAttribute("aria-sort") + ":" + values.length);
      document.body.setAttribute("data-shown", String(shown));
      document.body.setAttribute("data-cut", String(cut.length) + ":" + cut.join("|"));
      document.body.setAttribute("data-overflow", String(document.documentElement.scrollWidth > window.innerWidth));
    "#;
    for width in [1280, 480] {
        let dom = render_at(&browser, &page, width, probe);
        // accuracy, temperature, cost, heatmap, predicted labels, confusion, calibration
        assert_eq!(
            attribute(&dom, "data-charts-rendered"),
            Some("7"),
            "{width}px"
        );
        assert_eq!(
            attribute(&dom, "data-sorted"),
            Some("true:ascending:20"),
            "{width}px"
        );
        assert_eq!(
            attribute(&dom, "data-shown"),
            Some("10"),
            "{width}px: one model's cells"
        );
        assert_eq!(
            attribute(&dom, "data-cut"),
            Some("0:"),
            "{width}px: no label cut to an ellipsis"
        );
        assert_eq!(
            attribute(&dom, "data-overflow"),
            Some("false"),
            "{width}px: the page never scrolls sideways"
        );
        assert!(dom.matches("aria-sort=").count() > 40, "every header sorts");
        let png = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("report-grid-{width}.png"));
        assert_eq!(screenshot(&browser, &page, width, &png), width);
        println!("screenshot: {}", png.display());
    }
    Ok(())
}
