//! The program's decision for a packet: an XDP action and the reason counted for it.

use lb_common::Reason;

/// XDP action in the low byte, `Reason` index above it: one register, cheap to
/// pass around and to count.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u32);

impl Verdict {
    /// A decision to return `action`, counted under `reason`.
    #[inline(always)]
    pub fn new(action: u32, reason: Reason) -> Self {
        Self((reason as u32) << 8 | (action & 0xff))
    }

    /// The XDP action.
    #[inline(always)]
    pub fn action(self) -> u32 {
        self.0 & 0xff
    }

    /// Index of the reason counted for it (its `REASON_STATS` slot).
    #[inline(always)]
    pub fn reason_index(self) -> u32 {
        self.0 >> 8
    }

    /// Whether it was counted under `reason`.
    #[inline(always)]
    pub fn is(self, reason: Reason) -> bool {
        self.reason_index() == reason as u32
    }
}
