//! A training run killed with SIGKILL at each point of writing its adapter
//! (a real child process, stopped exactly there) never leaves a
//! half-written adapter visible: the next start serves the old version or
//! the new one, complete, and clears what the write left behind.

mod common;

use common::server::{tiny_job, Options, TestServer};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `steerling train` for adapter `name` into `dir`; with `pause`, kills
/// it with SIGKILL once it reports being stopped at that point.
fn train(dir: &Path, name: &str, seed: u64, pause: Option<&str>) {
    let mut job = tiny_job(name, 2, 2);
    job["output"] = dir.to_str().unwrap().into();
    job["settings"]["seed"] = seed.into();
    let config = dir.with_extension(format!("{name}-{seed}.json"));
    std::fs::write(&config, job.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_steerling"))
        .args(["train", "--config", config.to_str().unwrap()])
        .args(["--model", common::tiny_gguf().to_str().unwrap()])
        .env("STEERLING_PAUSE_AT", pause.unwrap_or(""))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let Some(point) = pause else {
        let status = child.wait().unwrap();
        let said: Vec<u8> = rx.iter().flatten().collect();
        assert!(status.success(), "{}", String::from_utf8_lossy(&said));
        return;
    };
    let mut said = String::new();
    let wanted = format!("paused at {point}");
    while !said.contains(&wanted) {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(chunk) => said += &String::from_utf8_lossy(&chunk),
            Err(_) => panic!("never reached {point}: {said}"),
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn weights(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name).join("adapter.safetensors")).unwrap()
}

/// Starts a server on `dir` (what a restart does) and lists its adapters.
async fn served_after_restart(dir: &Path) -> Vec<String> {
    let s = TestServer::start(Options {
        adapters: Some(dir.to_path_buf()),
        ..Options::default()
    })
    .await;
    let models: Value = s.get_json("/v1/models").await;
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["parent"].is_string())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_an_adapter_write_never_leaves_half_an_adapter() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("adapters");
    train(&dir, "kept", 1, None);
    let first = weights(&dir, "kept");
    // Replacing an existing adapter: killed before the swap, the old one
    // stays; killed after it, the new one is there, whole.
    for (seed, point, new_expected) in [
        (2, "adapter-write:config", false),
        (3, "adapter-write:weights", false),
        (4, "adapter-write:exchanged", true),
    ] {
        train(&dir, "kept", seed, Some(point));
        assert!(
            !leftovers(&dir).is_empty(),
            "{point}: the kill landed mid-write"
        );
        assert_eq!(served_after_restart(&dir).await, ["kept"], "{point}");
        let now = weights(&dir, "kept");
        assert_eq!(
            now != first,
            new_expected,
            "{point}: which version is served"
        );
        assert_eq!(
            leftovers(&dir),
            Vec::<String>::new(),
            "{point}: cleared at start"
        );
    }
    // A new adapter: absent until its folder is renamed into place.
    for (point, visible) in [
        ("adapter-write:config", false),
        ("adapter-write:weights", false),
        ("adapter-write:renamed", true),
    ] {
        let _ = std::fs::remove_dir_all(dir.join("fresh"));
        train(&dir, "fresh", 5, Some(point));
        let mut expected = vec!["fresh", "kept"];
        if !visible {
            expected.remove(0);
        }
        let mut served = served_after_restart(&dir).await;
        served.sort();
        assert_eq!(served, expected, "{point}");
        assert_eq!(leftovers(&dir), Vec::<String>::new(), "{point}");
    }
}
