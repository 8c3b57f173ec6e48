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
