//! Training steering adapters (DESIGN.md §4): a differentiable forward on
//! dense weights and the KL + KTO objective. The job queue and the trainer
//! loop build on these.

mod batch;
pub mod calibration;
pub mod data;
pub mod jobs;
pub mod losses;
mod measure;
pub mod model;
mod output;
pub use output::recover_interrupted_writes;
pub mod trainer;
