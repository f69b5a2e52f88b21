//! Runs tests/openai_client.py (the official `openai` package) against a
//! real `steerling serve` process on the default model.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    let port = free_port();
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_steerling"))
            .args(["serve", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && Command::new("python3")
                .args(["-c", &format!("import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('{base}/ready').status == 200 else 1)")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
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
