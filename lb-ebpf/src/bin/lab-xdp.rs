//! Helper XDP programs for the namespace lab and the benchmark.
//!
//! `xdp_pass` goes on the far end of a veth: frames sent with XDP_TX/REDIRECT
//! into a veth only arrive when its peer runs an XDP program. `xdp_bounce`
//! swaps MACs and bounces the frame: the cheapest useful XDP program, the
//! baseline the balancer's cost is compared with.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Lets every frame through to the stack.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps source and destination MAC and transmits back out.
#[xdp]
pub fn xdp_bounce(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let p = start as *mut [u8; 6];
    // SAFETY: the first 12 bytes were bounds-checked above.
    unsafe {
        let dst = *p;
        *p = *p.add(1);
        *p.add(1) = dst;
    }
    xdp_action::XDP_TX
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
