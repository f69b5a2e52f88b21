//! steerling: an OpenAI-compatible inference server that steers, and proves,
//! the distribution of its outputs across requests.

pub mod api;
pub mod cli;
pub mod engine;
pub mod faults;
pub mod fetch;
pub mod fleet;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod steering;
pub mod testing;
pub mod tokenizer;
pub mod training;

/// The text a panic carried (for logs; never sent to clients).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown")
}
