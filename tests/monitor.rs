//! The monitor on recorded rounds: detection, the report's figures against
//! hand-computed values, windows, status, and the page in a real browser.

mod common;

use common::server::{Options, TestServer};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use steerling::model::{load_model, ModelSource};
use steerling::monitor::report::{Status, WindowKind};
use steerling::monitor::{Monitor, MonitorConfig};
use steerling::steering::adapter::DetectionRule;
use steerling::steering::{Adapter, BaseIdentity, Detected, Registry};
use steerling::testing::{write_test_adapter, TestAdapter};

fn adapter(dir: &std::path::Path, name: &str, spec: TestAdapter) -> Arc<Adapter> {
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    write_test_adapter(dir, name, &loaded.model.config, &loaded.sha256, &spec).unwrap();
    let registry = Registry::new(
        dir.to_path_buf(),
        BaseIdentity {
            name: "tiny".into(),
            sha256: loaded.sha256.clone(),
        },
        loaded.model.config.clone(),
    );
    registry.load(name).unwrap()
}

#[test]
fn detection_rules_on_word_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let a = adapter(dir.path(), "d", TestAdapter::default());
    let d = &a.detector;
    assert_eq!(d.detect("nothing here"), Detected::None);
    assert_eq!(d.detect("ALPHA0 then alpha1"), Detected::Value(1));
    assert_eq!(d.detect("alpha1, later Alpha0."), Detected::Value(0));
    assert_eq!(
        d.detect("alpha0s and xalpha1"),
        Detected::None,
        "whole words only"
    );
    assert_eq!(
        d.detect_with("alpha0 alpha0 alpha1", DetectionRule::Majority),
        Detected::Value(0)
    );
    assert_eq!(
        d.detect_with("alpha0 alpha1", DetectionRule::Majority),
        Detected::Ambiguous
    );
    assert_eq!(
        d.detect_with("alpha0 alpha1", DetectionRule::LastMention),
        Detected::Value(1)
    );
}

#[test]
fn report_figures_match_hand_computed_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = adapter(dir.path(), "m", TestAdapter::default());
    let monitor = Monitor::new(MonitorConfig {
        min_rounds: 5,
        window_time: Duration::from_millis(300),
        ..Default::default()
    });
    // drawn v0 ×6, v1 ×4; detected v0 ×5, v1 ×3, none ×2; 7 agree.
    let rounds = [
        (0, "alpha0"),
        (0, "alpha0"),
        (0, "alpha0"),
        (0, "alpha0"),
        (0, "alpha1"),
        (0, "none"),
        (1, "alpha1"),
        (1, "alpha1"),
        (1, "alpha0"),
        (1, "nothing"),
    ];
    for (drawn, text) in rounds {
        monitor.record(&a, "default", drawn, text);
    }
    let report = monitor.report(None, None, None);
    let w = &report.adapters[0].aggregate[0];
    assert_eq!(w.window, WindowKind::Count);
    assert_eq!(w.n, 10);
    assert_eq!((w.drawn["v0"].count, w.drawn["v1"].count), (6, 4));
    assert_eq!(
        (
            w.detected["v0"].count,
            w.detected["v1"].count,
            w.detected_none
        ),
        (5, 3, 2)
    );
    assert!((w.consistency.unwrap() - 6.0 / 8.0).abs() < 1e-12);
    let m = &w.detected_metrics;
    assert!((m.mae - 0.125).abs() < 1e-12);
    let kl = 0.5 * (0.5f64 / 0.625).ln() + 0.5 * (0.5f64 / 0.375).ln();
    assert!((m.kl - kl).abs() < 1e-9);
    assert!((m.total_variation - 0.125).abs() < 1e-12);
    assert!((m.chi_square - 0.5).abs() < 1e-12 && m.chi_square_df == 1);
    assert!((m.chi_square_p - 0.479_500_1).abs() < 1e-6);
    assert!((w.drawn_metrics.mae - 0.1).abs() < 1e-12);
    assert_eq!(
        w.status,
        Status::Alert,
        "MAE 0.125 is above the 0.10 alert threshold"
    );
    let (lo, hi) = (w.detected["v0"].low, w.detected["v0"].high);
    let (elo, ehi) = steerling::monitor::stats::wilson(5, 8, 1.96);
    assert_eq!((lo, hi), (elo, ehi));
    // The time window empties; the count window keeps its rounds.
    std::thread::sleep(Duration::from_millis(400));
    let report = monitor.report(None, None, None);
    assert_eq!(report.adapters[0].aggregate[0].n, 10);
    assert_eq!(report.adapters[0].aggregate[1].window, WindowKind::Time);
    assert_eq!(report.adapters[0].aggregate[1].n, 0);
    assert_eq!(
        report.adapters[0].aggregate[1].status,
        Status::InsufficientData
    );
}

#[test]
fn per_context_windows_and_mixed_aggregate_target() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TestAdapter {
        contexts: vec![
            ("nurse".into(), vec![0.9, 0.1]),
            ("pilot".into(), vec![0.1, 0.9]),
        ],
        ..Default::default()
    };
    let a = adapter(dir.path(), "c", spec);
    let monitor = Monitor::new(MonitorConfig {
        window_rounds: 4,
        ..Default::default()
    });
    for _ in 0..3 {
        monitor.record(&a, "nurse", 0, "alpha0");
    }
    for _ in 0..3 {
        monitor.record(&a, "pilot", 1, "alpha1");
    }
    let report = monitor.report(Some("c"), None, Some(WindowKind::Count));
    let r = &report.adapters[0];
    assert_eq!(r.contexts["nurse"][0].n, 3);
    assert_eq!(r.contexts["nurse"][0].target["v0"], 0.9);
    // The aggregate count window holds the last 4 rounds: 1 nurse, 3 pilot.
    let agg = &r.aggregate[0];
    assert_eq!(agg.n, 4);
    assert!((agg.target["v0"] - (0.9 + 3.0 * 0.1) / 4.0).abs() < 1e-12);
    let only = monitor.report(Some("c"), Some("pilot"), None);
    assert_eq!(only.adapters[0].contexts.len(), 1);
}

/// Headless Chromium renders the page; its network log shows every request
/// the page started (initiator = the page's origin), and none leaves loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_page_renders_in_chromium_without_external_requests() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("headless Chromium is needed for this test (Debian package `chromium`; .ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    let spec = TestAdapter {
        contexts: vec![("nurse".into(), vec![0.86, 0.14])],
        ..Default::default()
    };
    write_test_adapter(
        dir.path(),
        "occupation",
        &loaded.model.config,
        &loaded.sha256,
        &spec,
    )
    .unwrap();
    let s = TestServer::start(Options {
        adapters: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let a = s.state.registry.get().unwrap().get("occupation").unwrap();
    for i in 0..60 {
        let drawn = usize::from(i % 7 == 0);
        let text = if i % 9 == 0 {
            "nothing"
        } else if drawn == 0 {
            "alpha0"
        } else {
            "alpha1"
        };
        s.state.monitor.record(
            &a,
            if i % 2 == 0 { "nurse" } else { "default" },
            drawn,
            text,
        );
    }
    let out_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let shot = out_dir.join("distribution-report.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let url = s.url("/distribution");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1200,1400",
            &format!("--user-data-dir={}", profile.path().display()),
        ]);
        cmd.args(extra).arg(&url);
        cmd.output().unwrap()
    };
    let netlog = out_dir.join("distribution-report-netlog.json");
    let dom = run(&["--dump-dom", &format!("--log-net-log={}", netlog.display())]);
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.contains("<svg") && dom.contains("<rect"),
        "the charts are in the rendered DOM: {dom}"
    );
    assert!(dom.contains("context: nurse"));
    let out = run(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 20_000,
        "a page with charts is not a blank image ({} bytes)",
        png.len()
    );
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&netlog).unwrap()).unwrap();
    let origin = s.base.clone();
    let mut page_loaded = false;
    for event in log["events"].as_array().unwrap() {
        let (Some(url), Some(initiator)) = (
            event["params"]["url"].as_str(),
            event["params"]["initiator"].as_str(),
        ) else {
            continue;
        };
        page_loaded |= url.starts_with(&format!("{origin}/distribution"));
        if initiator == origin {
            assert!(
                url.starts_with("http://127.0.0.1"),
                "the page requested {url}"
            );
        }
    }
    assert!(page_loaded, "the network log shows the page load");
    let report: Value = reqwest::get(s.url("/distribution/report"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["adapters"][0]["aggregate"][0]["n"], 60);
}
