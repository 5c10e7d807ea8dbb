//! Contracts between the XDP data plane (`lb-ebpf`) and the userspace agent
//! (`lb-userspace`): map names, keys, values and limits, plus the pure logic both
//! sides must agree on bit for bit (flow hash, Maglev table, checksum updates).
#![no_std]

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
