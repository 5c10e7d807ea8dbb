//! Contracts between the XDP data plane (`lb-ebpf`) and the userspace agent
//! (`lb-userspace`): map names, keys, values and limits, plus the pure logic both
//! sides must agree on bit for bit (flow hash, Maglev table, checksum updates).
//!
//! # Layout
//!
//! - `maps`: every map of `lb-xdp` (name, key, value, size, who writes it and
//!   why), the `Reason` codes its counters use, the limits (`MAX_VIPS`,
//!   `MAX_BACKENDS`, `MAX_WEIGHT`, ...) both sides size things by.
//! - `decap`: the same for `lb-decap`, the backends' IPIP/IP6IP6 stripper.
//! - `hash`: the fixed-seed flow hash (Maglev slot, flow-cache slot, outer
//!   source) computed alike in the kernel and in tests.
//! - `csum`: incremental Internet-checksum updates (RFC 1624) for NAT.
//! - `maglev` (feature `user`): the weighted Maglev table builder the agent
//!   fills `RINGS` with.
#![no_std]
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

#[cfg(feature = "user")]
extern crate alloc;

pub mod csum;
pub mod decap;
pub mod hash;
#[cfg(feature = "user")]
pub mod maglev;
pub mod maps;

pub use decap::*;
pub use maps::*;
