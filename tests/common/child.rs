//! A real `steerling serve` process on a free loopback port, killed when
//! dropped; its output goes to a log file the test can read.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ChildServer {
    pub port: u16,
    pub base: String,
    pub log: std::path::PathBuf,
    child: Child,
    _logdir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ChildServer {
    /// Starts `steerling serve <args> --port <free>` with extra environment
    /// and waits until /ready answers 200.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("server.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_steerling"))
            .arg("serve")
            .args(args)
            .args(["--port", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        let server = Self {
            port,
            base: format!("http://127.0.0.1:{port}"),
            log,
            child,
            _logdir: logdir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.status("GET", "/ready", None) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "server did not become ready:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The status of a bodiless request (None when nothing answers).
    pub fn status(&self, method: &str, path: &str, key: Option<&str>) -> Option<u16> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}content-length: 0\r\nconnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split(' ').nth(1)?.parse().ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
