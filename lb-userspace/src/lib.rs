//! The load balancer's userspace: configuration, the agent that drives the XDP
//! data plane, metrics, and the namespace lab shared by demo, tests and benchmarks.
//! The L7 proxy is the crate `lb-proxy` (`lb-userspace/proxy`); this one uses
//! it, never the reverse.
//!
//! # Layout
//!
//! In the order a start goes through them:
//!
//! - `config`: the file (one TOML parse, every error at its line) into a
//!   `Config`; `config::rules` are the L4 rules runtime changes share.
//! - `runtime`: what should run (`Desired`): the file plus the journal of
//!   runtime changes and the backends DNS discovery found; `atomic_file`
//!   writes it (and the other state files) whole and durably.
//! - `discovery`: DNS answers into backend sets (pure), `discovery::dns`
//!   the queries.
//! - `dataplane`: loads, pins and attaches `lb-xdp`, reads and writes its
//!   maps (layouts in `lb_common::maps`).
//! - `balancer`: `Config` into ids, Maglev tables and map updates, in an
//!   order that never leaves a packet without a path.
//! - `health`: the checks whose results `agent` folds into availability.
//! - `bgp`: which VIPs this node announces and BIRD driven to say so.
//! - `claims`: the addresses an agent listens on, kept from a second agent;
//!   `takeover`: `lb run --takeover`, a new agent replacing the running one.
//! - `agent`: `lb run`: ties the above together, serves `control` (socket,
//!   protocol, CLI), `metrics` and `admin` (REST API, stats page), runs
//!   the L7 proxy from `lb_proxy`.
//! - `top`: `lb top`, the terminal dashboard over the control socket.
//! - `syslog`: the access log to a syslog daemon (`[proxy] syslog`).
//! - `fd_limit`: RLIMIT_NOFILE raised to what the frontends may use;
//!   `conn_limit`: the cap on metrics and admin connections.
//! - `decap`: `lb decap` for backends; `demo` and `lab`: the namespace lab
//!   the demo, the tests and the benchmarks share.
//!
//! Edges run downwards only: no module cycle (checked over `use crate::`
//! paths; see tests/TESTS.md).
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod admin;
pub mod agent;
mod allocator;
pub mod atomic_file;
pub mod balancer;
pub mod bgp;
pub mod claims;
pub mod config;
pub mod conn_limit;
pub mod control;
pub mod dataplane;
pub mod decap;
pub mod demo;
pub mod discovery;
pub mod fd_limit;
pub mod health;
pub mod lab;
pub mod metrics;
pub mod runtime;
pub mod syslog;
pub mod takeover;
pub mod top;

/// The global allocator the binaries install (`#[global_allocator]`), so that
/// `lb` and the benchmark that runs the proxy in-process allocate alike.
pub use allocator::Allocator;

/// The value to install: `static A: Allocator = ALLOCATOR;`.
pub const ALLOCATOR: Allocator = Allocator;
