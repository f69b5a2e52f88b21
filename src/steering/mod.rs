//! Steering adapters and the draw (DESIGN.md §2): each round samples a hidden
//! steering token from the adapter's calibrated prior (or another policy)
//! and the answer is generated conditioned on it.

pub mod adapter;
pub mod detect;
pub mod draw;
pub mod registry;

pub use adapter::{AdapterConfig, AdapterWeights};
pub use detect::{Detected, Detector};
pub use draw::{BalancedCounts, Policy};
pub use registry::{Adapter, BaseIdentity, Registry};
