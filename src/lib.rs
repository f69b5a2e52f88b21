//! steerling: an OpenAI-compatible inference server that steers, and proves,
//! the distribution of its outputs across requests.

pub mod api;
pub mod cli;
pub mod engine;
pub mod fetch;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod steering;
pub mod testing;
pub mod tokenizer;
pub mod training;
