//! XDP load balancer: VIP lookup, LRU connection table, Maglev backend choice and
//! NAT forwarding, all before the packet reaches a socket.
//!
//! Per packet: parse (`parse`), then one `FLOWS` lookup: a client packet of a
//! known connection is NATed to its pinned backend (`nat`), a backend's reply
//! is translated back to the VIP. Otherwise a `VIPS` hit is a new connection:
//! its backend comes from the VIP's Maglev ring (`RINGS`) and both directions
//! are recorded. Both go out through the next hop `bpf_fib_lookup` gives
//! (`forward`). Before anything is created or rewritten, `checks` refuses
//! what the stack would not forward either (another host's MAC, a bad IPv4
//! header checksum, martian or spoofed sources of new flows). Everything else
//! passes to the kernel untouched. Every decision is counted (`stats`).
//!
//! Everything is inlined into one function: BPF subprograms each get their own
//! frame, but the verifier limits the frames of a call chain to 512 bytes in
//! total, and one inlined frame (about 424 bytes) packs tighter than the chain.
#![no_std]
#![no_main]

mod checks;
mod forward;
mod icmp;
mod maps;
mod nat;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    BACKEND_F_VALID, Backend, FLOW_TO_BACKEND, FLOW_TO_CLIENT, Flow, FlowKey, Reason, VIP_F_L7,
    VipKey, hash::flow_hash,
};

use crate::{
    maps::{BACKENDS, FLOWS, RINGS, VIP_STATE, VIPS},
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
    // One lookup serves established connections in both directions.
    let mut pinned: Option<(u32, u32)> = None; // (vip id, backend id)
    let mut create: Option<(u32, u32)> = None; // (vip id, VIP generation)
    // SAFETY: LRU entries are written whole by this program; a racing update at
    // worst yields the previous value for the same 5-tuple.
    if let Some(flow) = unsafe { FLOWS.get(pkt.key) } {
        let flow = *flow;
        if flow.direction == FLOW_TO_CLIENT {
            if let Err(reason) = checks::forwardable(ctx, &pkt) {
                return Verdict::new(xdp_action::XDP_DROP, reason);
            }
            return forward::send(
                ctx,
                &pkt,
                &flow.vip_addr,
                flow.vip_port,
                nat::Side::Source,
                false,
            );
        }
        // Valid while its VIP is the one it was created under.
        if let Some(state) = VIP_STATE.get(flow.vip_id)
            && state.generation == flow.vip_generation
        {
            match BACKENDS.get(flow.backend_id) {
                Some(b) if b.flags & BACKEND_F_VALID != 0 => {
                    pinned = Some((flow.vip_id, flow.backend_id))
                }
                // Its backend is gone: re-hash instead of black-holing it.
                _ => create = Some((flow.vip_id, state.generation)),
            }
        }
    }
    if pinned.is_none() && create.is_none() {
        let vip = VipKey {
            addr: pkt.key.dst,
            port: pkt.key.dport,
            proto: pkt.key.proto,
            family: pkt.key.family,
        };
        // SAFETY: VIPS is updated whole-element by userspace; VipMeta is two words.
        let Some(meta) = (unsafe { VIPS.get(vip) }) else {
            return Verdict::new(xdp_action::XDP_PASS, Reason::PassNotVip);
        };
        if meta.flags & VIP_F_L7 != 0 {
            return Verdict::new(xdp_action::XDP_PASS, Reason::PassL7);
        }
        let Some(state) = VIP_STATE.get(meta.vip_id) else {
            return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
        };
        create = Some((meta.vip_id, state.generation));
    }
    // From here the packet goes to a backend unless a check refuses it; flows
    // are only created for packets that pass.
    if let Err(reason) = checks::forwardable(ctx, &pkt) {
        return Verdict::new(xdp_action::XDP_DROP, reason);
    }
    if create.is_some()
        && let Err(reason) = checks::new_flow_source(&pkt)
    {
        return Verdict::new(xdp_action::XDP_DROP, reason);
    }
    // Expiring here: answer for the VIP (the stack would say "unreachable",
    // having no route for it), and create no flow.
    if pkt.ttl <= 1 {
        return icmp::time_exceeded(ctx, &pkt);
    }
    if let Some((vip_id, generation)) = create {
        match new_flow(&pkt, vip_id, generation) {
            Ok(backend_id) => pinned = Some((vip_id, backend_id)),
            Err(reason) => return Verdict::new(xdp_action::XDP_DROP, reason),
        }
    }
    let Some((vip_id, backend_id)) = pinned else {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
    };
    match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_F_VALID != 0 => {
            let backend = *b;
            to_backend(ctx, &pkt, vip_id, backend_id, &backend)
        }
        _ => Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend),
    }
}

/// Client -> VIP on a pinned backend: NAT the destination to it.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    vip_id: u32,
    backend_id: u32,
    backend: &Backend,
) -> Verdict {
    if backend.family != pkt.key.family {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = forward::send(
        ctx,
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

/// A new connection (or one whose backend is gone): picks a backend from the
/// VIP's Maglev ring and records both directions in the flow table. Returns
/// the backend id; `DropNoBackend` if the VIP has no live backend,
/// `DropReplyCollision` if the backend's replies could not be told apart
/// from those of a live connection of another VIP.
#[inline(always)]
fn new_flow(pkt: &Packet, vip_id: u32, generation: u32) -> Result<u32, Reason> {
    let backend_id = pick_backend(vip_id, &pkt.key).ok_or(Reason::DropNoBackend)?;
    let backend = match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_F_VALID != 0 => b,
        _ => return Err(Reason::DropNoBackend),
    };
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
    // Only the destination is translated, so the same client address and
    // port connected to two VIPs that land on the same backend make the same
    // reply 5-tuple (and the same connection, as far as the backend can
    // tell). Writing ours would send the other connection's replies from
    // the wrong VIP: refuse, unless that connection is gone.
    // SAFETY: LRU entries are written whole by this program.
    if let Some(old) = unsafe { FLOWS.get(reply_key) }
        && old.direction == FLOW_TO_CLIENT
        && (old.vip_addr != pkt.key.dst || old.vip_port != pkt.key.dport)
        && other_flow_is_live(pkt, old)
    {
        return Err(Reason::DropReplyCollision);
    }
    let mut flow = Flow {
        direction: FLOW_TO_BACKEND,
        family: pkt.key.family,
        vip_port: pkt.key.dport,
        vip_addr: pkt.key.dst,
        vip_id,
        backend_id,
        vip_generation: generation,
    };
    let _ = FLOWS.insert(pkt.key, flow, 0);
    flow.direction = FLOW_TO_CLIENT;
    let _ = FLOWS.insert(reply_key, flow, 0);
    Ok(backend_id)
}

/// Whether the connection a reply entry `old` belongs to still stands: its
/// client direction is in the table and valid under its VIP's generation.
/// (Runs only on a collision, so it costs the common path nothing.)
#[inline(always)]
fn other_flow_is_live(pkt: &Packet, old: &Flow) -> bool {
    let client_key = FlowKey {
        src: pkt.key.src,
        dst: old.vip_addr,
        sport: pkt.key.sport,
        dport: old.vip_port,
        proto: pkt.key.proto,
        family: pkt.key.family,
        pad: [0; 2],
    };
    // SAFETY: as above.
    let Some(client) = (unsafe { FLOWS.get(client_key) }) else {
        return false;
    };
    client.direction == FLOW_TO_BACKEND
        && VIP_STATE
            .get(client.vip_id)
            .is_some_and(|s| s.generation == client.vip_generation)
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
