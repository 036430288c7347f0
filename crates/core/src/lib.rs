//! Shared pieces of diffuse: the torch-compatible generator, the error type and test helpers.

pub mod device;
pub mod error;
pub mod rng;
pub mod testing;

pub use error::{Error, Result};
pub use rng::{BatchShard, Generator, NoiseSource};
