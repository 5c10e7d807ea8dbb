//! The load balancer's userspace: configuration, the agent that drives the XDP
//! data plane, metrics, and the namespace lab shared by demo, tests and benchmarks.

pub mod agent;
mod allocator;
pub mod balancer;
pub mod bgp;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod decap;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod lab;
pub mod metrics;
pub mod runtime;

/// The global allocator the binaries install (`#[global_allocator]`), so that
/// `lb` and the benchmark that runs the proxy in-process allocate alike.
pub use allocator::Allocator;

/// The value to install: `static A: Allocator = ALLOCATOR;`.
pub const ALLOCATOR: Allocator = Allocator;
