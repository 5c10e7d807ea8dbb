//! XDP load balancer: VIP lookup, LRU connection table, Maglev backend choice and
//! NAT forwarding, all before the packet reaches a socket.
//!
//! Per packet: parse (`parse`), look the destination up in `VIPS`; a VIP hit is
//! pinned to a backend through `CONNTRACK` (or `RINGS` on a miss) and NATed to it
//! (`nat`); a miss that matches `NAT_REPLY` is a backend's reply and is translated
//! back to the VIP. Both go out through `bpf_fib_lookup` (`forward`). Everything
//! else passes to the kernel untouched. Every decision is counted (`stats`).
//!
//! Everything is inlined into one function: BPF subprograms each get their own
//! frame, but the verifier limits the frames of a call chain to 512 bytes in
//! total, and one inlined frame (about 424 bytes) packs tighter than the chain.
#![no_std]
#![no_main]

mod forward;
mod maps;
mod nat;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    BACKEND_F_VALID, FlowKey, FlowState, NatReply, Reason, VIP_F_L7, VipKey, hash::flow_hash,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, NAT_REPLY, RINGS, VIPS},
    parse::Packet,
    verdict::Verdict,
};

/// Entry point attached to the balancer's interfaces.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = process(&ctx);
    stats::count_reason(verdict.reason_index(), len);
    verdict.action()
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return Verdict::new(xdp_action::XDP_PASS, reason),
    };
    let vip = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.key.family,
    };
    // SAFETY: VIPS is updated whole-element by userspace; VipMeta is two words.
    if let Some(meta) = unsafe { VIPS.get(vip) } {
        if meta.flags & VIP_F_L7 != 0 {
            return Verdict::new(xdp_action::XDP_PASS, Reason::PassL7);
        }
        return to_backend(XdpContext::new(ctx.ctx), &pkt, meta.vip_id);
    }
    // SAFETY: LRU entries are written whole by this program; a racing update at
    // worst yields the previous value of the same flow.
    if let Some(reply) = unsafe { NAT_REPLY.get(pkt.key) } {
        let reply = *reply;
        return to_client(XdpContext::new(ctx.ctx), &pkt, &reply);
    }
    Verdict::new(xdp_action::XDP_PASS, Reason::PassNotVip)
}

/// Client -> VIP: pick the flow's backend and NAT the destination to it.
#[inline(always)]
fn to_backend(ctx: XdpContext, pkt: &Packet, vip_id: u32) -> Verdict {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let mut backend_id = u32::MAX;
    // SAFETY: see `process`.
    if let Some(state) = unsafe { CONNTRACK.get(pkt.key) } {
        backend_id = state.backend_id;
    }
    let backend = match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_F_VALID != 0 => *b,
        _ => {
            // New flow, or its backend is gone: consult the Maglev ring.
            backend_id = new_flow(pkt, vip_id);
            match BACKENDS.get(backend_id) {
                Some(b) if b.flags & BACKEND_F_VALID != 0 => *b,
                _ => return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend),
            }
        }
    };
    if backend.family != pkt.key.family {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
    }
    let verdict = forward::send(
        &ctx,
        pkt,
        &backend.addr,
        backend.port,
        nat::Side::Destination,
        true,
    );
    if verdict.is(Reason::TxForward) || verdict.is(Reason::RedirectForward) {
        stats::count_vip(vip_id, len);
        stats::count_backend(backend_id, len);
    }
    verdict
}

/// Picks a backend for a flow from the VIP's Maglev ring and records the flow in
/// the connection table and the reply-translation table. Returns the backend
/// id, or `u32::MAX` if the VIP has no live backend.
#[inline(always)]
fn new_flow(pkt: &Packet, vip_id: u32) -> u32 {
    let Some(backend_id) = pick_backend(vip_id, &pkt.key) else {
        return u32::MAX;
    };
    let backend = match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_F_VALID != 0 => b,
        _ => return u32::MAX,
    };
    let state = FlowState { backend_id, vip_id };
    let _ = CONNTRACK.insert(pkt.key, state, 0);
    // The reply arrives with the backend as source; remember how to undo the NAT.
    let reply_key = FlowKey {
        src: backend.addr,
        dst: pkt.key.src,
        sport: backend.port,
        dport: pkt.key.sport,
        proto: pkt.key.proto,
        family: pkt.key.family,
        pad: [0; 2],
    };
    let reply = NatReply {
        vip_addr: pkt.key.dst,
        vip_port: pkt.key.dport,
        family: pkt.key.family,
        pad: 0,
        vip_id,
        backend_id,
    };
    let _ = NAT_REPLY.insert(reply_key, reply, 0);
    backend_id
}

/// Backend -> client: make the reply come from the VIP again.
#[inline(always)]
fn to_client(ctx: XdpContext, pkt: &Packet, reply: &NatReply) -> Verdict {
    forward::send(
        &ctx,
        pkt,
        &reply.vip_addr,
        reply.vip_port,
        nat::Side::Source,
        false,
    )
}

/// Maglev lookup: `ring[flow_hash % size]`.
#[inline(always)]
fn pick_backend(vip_id: u32, key: &FlowKey) -> Option<u32> {
    // SAFETY: RINGS has no prealloc: userspace replaces a ring as a new element
    // under RCU, so this reference stays a complete, consistent table.
    let ring = unsafe { RINGS.get(vip_id)? };
    let size = ring.size;
    if size == 0 {
        return None;
    }
    let idx = flow_hash(key) % size;
    ring.entries.get(idx as usize).copied()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
