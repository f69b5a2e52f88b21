//! Pause points for crash tests. With `STEERLING_PAUSE_AT=<point>` in its
//! environment the process stops at that point, says so on stderr, and
//! waits to be killed, so a test can kill it exactly there. Unset, a point
//! costs one cached lookup.

use std::sync::OnceLock;

pub fn pause_point(point: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("STEERLING_PAUSE_AT").ok());
    if at.as_deref() == Some(point) {
        eprintln!("\npaused at {point}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
