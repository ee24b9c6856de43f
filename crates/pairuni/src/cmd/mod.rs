//! One module per command group; each exposes `Args` and `run`.

pub mod ablate;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod gpu;
pub mod model;
pub mod pairs;
pub mod report;
pub mod train;
pub mod world;
