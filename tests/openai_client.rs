//! Runs tests/openai_client.py (the official `openai` package) against a
//! real `steerling serve` process on the default model.

mod common;

use common::child::ChildServer;
use std::process::Command;

#[test]
fn official_openai_client_works_against_steerling_serve() {
    common::smollm2();
    let have_client = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_client,
        "the official client is needed: `python3 -m pip install openai` (.ci/run installs it)"
    );
    let server = ChildServer::start(&[], &[]);
    let base = &server.base;
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .arg(format!("{base}/v1"))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"));
    drop(server);
}
