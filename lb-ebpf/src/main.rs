//! XDP load balancer: VIP lookup, LRU connection table, Maglev backend choice and
//! NAT forwarding, all before the packet reaches a socket.
//!
//! Per packet: parse (`parse`), then one flow lookup (`flows`): a client packet of a
//! known connection is NATed to its pinned backend (`nat`), a backend's reply
//! is translated back to the VIP. Otherwise, and for every SYN whatever the
//! table holds (see `Older`), a `VIPS` hit is a new connection:
//! its backend comes from the VIP's Maglev ring (`RINGS`) and both directions
//! are recorded: a UDP flow's in `UDP_FLOWS`, a TCP handshake's in
//! `PENDING` until the client's ACK confirms it and it moves to `FLOWS` (so
//! neither SYN nor UDP floods can evict established TCP connections). Both go out through the next hop `bpf_fib_lookup` gives
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
mod dsr;
mod echo;
mod fast;
mod flows;
mod forward;
mod icmp;
mod icmp_nat;
mod maps;
mod nat;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, maps::LruHashMap,
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_VALID, Backend, FAMILY_V6, FLOW_TO_BACKEND, FLOW_TO_CLIENT, Flow, FlowKey,
    PROG_FULL_SLOT, PROTO_TCP, Reason, VIP_F_DSR, VIP_F_HASH_SOURCE, VIP_F_L7, VipKey, flow_time,
    hash::{flow_hash, source_hash},
};

use crate::{
    maps::{BACKENDS, FLOWS, PENDING, PROGS, RINGS, VIP_STATE, VIPS},
    parse::{Packet, TCP_RST, TCP_SYN},
    verdict::Verdict,
};

/// Entry point attached to the balancer's interfaces: established flows
/// (`fast`), everything else in the full program it tail-calls.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(verdict) = fast::forward(&ctx) {
        stats::count_reason(verdict.reason_index(), len);
        return verdict.action();
    }
    // SAFETY: our own context; on success this does not return.
    unsafe { PROGS.tail_call(&ctx, PROG_FULL_SLOT) };
    // The agent fills PROGS before it attaches; should it be empty, the
    // stack gets the packet (what it would without us).
    xdp_action::XDP_PASS
}

/// Every packet `lb_xdp` leaves: the whole data plane.
#[xdp]
pub fn lb_xdp_full(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = process(&ctx);
    stats::count_reason(verdict.reason_index(), len);
    verdict.action()
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        // ICMP among them: echo requests to a VIP are answered (`echo`),
        // errors about NATed flows translated (`icmp_nat`).
        Err(Reason::PassOtherProto) => {
            if let Some(verdict) = echo::reply(ctx) {
                return verdict;
            }
            return unserved(ctx, icmp_nat::translate(ctx));
        }
        Err(Reason::PassFragment) => {
            return unserved(
                ctx,
                Verdict::new(xdp_action::XDP_PASS, Reason::PassFragment),
            );
        }
        Err(reason) => return Verdict::new(xdp_action::XDP_PASS, reason),
    };
    // One lookup serves established connections in both directions.
    let mut pinned: Option<u32> = None; // backend id
    let mut create: Option<(u32, u32)> = None; // (vip id, VIP generation)
    // The VIP's `VIP_F_*` bits (its forwarding mode).
    let mut flags = 0;
    // An established flow whose backend is gone: re-pinned in its flow table directly.
    let mut rehash = false;
    // The backend of a resolved hit, from this CPU's flow cache slot.
    let mut resolved: Option<&'static Backend> = None;
    // A client's SYN that finds an entry: an older connection's (see `Older`).
    let mut older = Older::None;
    if let Some(cached) = flows::lookup(&pkt.key) {
        if pkt.tcp_flags & TCP_SYN != 0 && cached.flow.direction == FLOW_TO_BACKEND {
            older = if cached.resolved != 0 {
                Older::Pinned(cached.flow.backend_id)
            } else {
                Older::Stale
            };
        } else if cached.resolved != 0 {
            // The hit path: the slot holds all it needs (see `CachedFlow`).
            flags = cached.vip_flags;
            pinned = Some(cached.flow.backend_id);
            resolved = Some(&cached.backend);
        } else if cached.flow.direction == FLOW_TO_CLIENT {
            let flow = cached.flow;
            return to_client(ctx, &pkt, &flow);
        } else if let Some(state) = VIP_STATE.get(cached.flow.vip_id)
            // Valid while its VIP is the one it was created under.
            && state.generation == cached.flow.vip_generation
        {
            flags = state.flags;
            let (vip_id, backend_id) = (cached.flow.vip_id, cached.flow.backend_id);
            match BACKENDS.get(backend_id) {
                Some(b) if b.flags & BACKEND_F_VALID != 0 => pinned = Some(backend_id),
                // Its backend is gone: re-hash instead of black-holing it.
                _ => {
                    create = Some((vip_id, state.generation));
                    rehash = true;
                }
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
            return not_a_vip(ctx, &pkt);
        };
        if let Err(reason) = checks::not_denied(&pkt) {
            return Verdict::new(xdp_action::XDP_DROP, reason);
        }
        if meta.flags & VIP_F_L7 != 0 {
            // The proxy's new connections count against the source prefix's
            // new-flow limit too (every SYN: no state here tells a
            // retransmission apart); the rest of its traffic passes.
            if pkt.tcp_flags & TCP_SYN != 0
                && let Err(reason) = checks::new_flow_rate(&pkt)
            {
                return Verdict::new(xdp_action::XDP_DROP, reason);
            }
            return Verdict::new(xdp_action::XDP_PASS, Reason::PassL7);
        }
        let Some(state) = VIP_STATE.get(meta.vip_id) else {
            return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
        };
        flags = meta.flags;
        create = Some((meta.vip_id, state.generation));
    }
    // From here the packet goes to a backend unless a check refuses it; flows
    // are only created for packets that pass.
    if let Err(reason) = checks::forwardable(ctx, &pkt, flags & VIP_F_DSR == 0) {
        return Verdict::new(xdp_action::XDP_DROP, reason);
    }
    if create.is_some()
        && let Err(reason) = checks::new_flow_source(&pkt)
    {
        return Verdict::new(xdp_action::XDP_DROP, reason);
    }
    // Expiring here (NAT routes it one hop; DSR passes it on untouched):
    // answer for the VIP (the stack would say "unreachable", having no
    // route for it), and create no flow.
    if pkt.ttl <= 1 && flags & VIP_F_DSR == 0 {
        return icmp::time_exceeded(ctx, &pkt);
    }
    if let Some((vip_id, generation)) = create {
        // TCP handshakes are admitted through PENDING; UDP flows and
        // re-pinned established ones go straight to their flow table.
        let chosen = if pkt.key.proto == PROTO_TCP && !rehash {
            admit_tcp(&pkt, vip_id, generation, flags, older)
        } else {
            new_flow(&pkt, vip_id, generation, rehash, flags)
        };
        match chosen {
            Ok(backend_id) => pinned = Some(backend_id),
            Err(reason) => return Verdict::new(xdp_action::XDP_DROP, reason),
        }
    }
    let Some(backend_id) = pinned else {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
    };
    let backend = match resolved {
        Some(b) => *b,
        None => match BACKENDS.get(backend_id) {
            Some(b) if b.flags & BACKEND_F_VALID != 0 => *b,
            _ => return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend),
        },
    };
    to_backend(ctx, &pkt, backend_id, &backend, flags)
}

/// `verdict`, unless it passes a packet for an `l4` VIP's address that the
/// stack does not have: that is dropped (see `checks::vip_only`).
#[inline(always)]
fn unserved(ctx: &XdpContext, verdict: Verdict) -> Verdict {
    if verdict.action() == xdp_action::XDP_PASS
        && let Some((addr, family)) = parse::destination(ctx)
        && checks::vip_only(&addr, family)
        && !(family == FAMILY_V6 && parse::neighbour_discovery(ctx))
    {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropVipUnserved);
    }
    verdict
}

/// A backend's packet of a known flow: NAT the source back to the VIP.
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet, flow: &Flow) -> Verdict {
    if let Err(reason) = checks::forwardable(ctx, pkt, true) {
        return Verdict::new(xdp_action::XDP_DROP, reason);
    }
    forward::send(
        ctx,
        pkt,
        &flow.vip_addr,
        flow.vip_port,
        nat::Side::Source,
        forward::Toward::Client,
    )
}

/// Neither in FLOWS nor to a VIP: a backend's packet of a TCP flow in
/// PENDING (its SYN-ACK or RST during the handshake, or its answer to a
/// connection whose FLOWS entry was lost, until the client's next packet
/// confirms it) is translated back from there; anything else is passed.
/// Costs one lookup for TCP traffic the balancer does not handle; backend
/// replies of established flows hit FLOWS first.
#[inline(always)]
fn not_a_vip(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    if pkt.key.proto == PROTO_TCP
        // SAFETY: LRU entries are written whole by this program.
        && let Some(flow) = unsafe { PENDING.get(pkt.key) }
        && flow.direction == FLOW_TO_CLIENT
    {
        let flow = *flow;
        return to_client(ctx, pkt, &flow);
    }
    // Another port or protocol of an l4 VIP's address.
    if checks::vip_only(&pkt.key.dst, pkt.key.family) {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropVipUnserved);
    }
    Verdict::new(xdp_action::XDP_PASS, Reason::PassNotVip)
}

/// Client -> VIP on a pinned backend: NAT the destination to it, or, in a
/// DSR mode (`flags`), send the packet to it as it is.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_id: u32,
    backend: &Backend,
    flags: u32,
) -> Verdict {
    if backend.family != pkt.key.family {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend);
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = if flags & VIP_F_DSR != 0 {
        dsr::send(ctx, pkt, backend_id, backend, flags)
    } else {
        forward::send(
            ctx,
            pkt,
            &backend.addr,
            backend.port,
            nat::Side::Destination,
            forward::Toward::Backend(backend_id),
        )
    };
    stats::count_forwarded(verdict, backend_id, len);
    verdict
}

/// The backend of a new flow from the VIP's Maglev ring, with its slot;
/// `flags` are the VIP's (`VIP_F_HASH_SOURCE`). `DropNoBackend` if the VIP
/// has no live backend.
#[inline(always)]
fn choose(vip_id: u32, key: &FlowKey, flags: u32) -> Result<(u32, &'static Backend), Reason> {
    let backend_id = pick_backend(vip_id, key, flags).ok_or(Reason::DropNoBackend)?;
    match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_F_VALID != 0 => Ok((backend_id, b)),
        _ => Err(Reason::DropNoBackend),
    }
}

/// Writes the 5-tuple of a backend's replies to `pkt`'s flow into `out`.
#[inline(always)]
fn reply_key(pkt: &Packet, backend: &Backend, out: &mut FlowKey) {
    out.src = backend.addr;
    out.dst = pkt.key.src;
    out.sport = backend.port;
    out.dport = pkt.key.sport;
    out.proto = pkt.key.proto;
    out.family = pkt.key.family;
    out.pad = [0; 2];
}

/// Writes the client direction of a new flow of `pkt` into `out`.
#[inline(always)]
fn client_flow(pkt: &Packet, vip_id: u32, backend_id: u32, generation: u32, out: &mut Flow) {
    out.direction = FLOW_TO_BACKEND;
    out.family = pkt.key.family;
    out.vip_port = pkt.key.dport;
    out.vip_addr = pkt.key.dst;
    out.vip_id = vip_id;
    out.backend_id = backend_id;
    out.vip_generation = generation;
    // SAFETY: helper without arguments.
    out.last_seen = flow_time(unsafe { bpf_ktime_get_coarse_ns() });
}

use crate::maps::scratch;

/// A UDP flow, or an established flow whose backend is gone: picks a
/// backend from the VIP's Maglev ring and records both directions in the
/// protocol's flow table. Returns the backend id; `DropNoBackend` if the VIP has no
/// live backend, `DropReplyCollision` if the backend's replies could not be
/// told apart from those of a live connection of another VIP,
/// `DropRateLimited` for a new flow over its source prefix's limit.
// By reference on purpose: the map helpers then get pointers into SCRATCH
// (or the packet's key); by value each key and flow would be copied onto a
// stack that has no room left.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn new_flow(
    pkt: &Packet,
    vip_id: u32,
    generation: u32,
    rehash: bool,
    flags: u32,
) -> Result<u32, Reason> {
    if !rehash {
        checks::new_flow_rate(pkt)?;
    }
    let dsr = flags & VIP_F_DSR != 0;
    let (backend_id, backend) = choose(vip_id, &pkt.key, flags)?;
    let s = scratch()?;
    let table = flows::table(pkt.key.proto);
    if dsr {
        // Replies bypass the balancer: only the client's direction is kept.
        client_flow(pkt, vip_id, backend_id, generation, &mut s.flow);
        let _ = table.insert(&pkt.key, &s.flow, 0);
        flows::written(&pkt.key);
        return Ok(backend_id);
    }
    // The reply arrives with the backend as source; remember how to undo the NAT.
    reply_key(pkt, backend, &mut s.reply);
    if reply_collides(table, pkt, &s.reply, &mut s.other) {
        return Err(Reason::DropReplyCollision);
    }
    client_flow(pkt, vip_id, backend_id, generation, &mut s.flow);
    let _ = table.insert(&pkt.key, &s.flow, 0);
    flows::written(&pkt.key);
    s.flow.direction = FLOW_TO_CLIENT;
    flows::insert_reply(&s.reply, &s.flow);
    Ok(backend_id)
}

/// What a client's SYN found in FLOWS for its 5-tuple: an older connection's
/// entry, the client having reused its port. A SYN starts a new connection,
/// so (as in Katran, whose SYNs skip its LRU) the VIP's table decides, not
/// that entry: else a new connection would follow an old one to a backend
/// that is drained or weighted out, or stay off one just added.
#[derive(Clone, Copy)]
enum Older {
    /// No entry.
    None,
    /// An entry valid under its VIP's generation, on this backend id.
    Pinned(u32),
    /// An entry of an older generation or of a backend that is gone.
    Stale,
}

impl Older {
    /// Keeps the older entry of `key` if it pins `backend_id` (the
    /// handshake's next packets may use it); otherwise deletes it, so they
    /// do not find it, and makes every CPU's cached copy stale. Either way
    /// the SYN is then admitted as any other (PENDING holds its reply
    /// direction too, should `FLOWS` have lost the older one's).
    #[inline(always)]
    fn settle(self, key: &FlowKey, backend_id: u32) {
        match self {
            Older::None => {}
            Older::Pinned(id) if id == backend_id => {}
            _ => {
                let _ = FLOWS.remove(key);
                flows::written(key);
                flows::bump_epoch();
            }
        }
    }
}

/// A TCP packet to an `l4` VIP that is not in FLOWS, or a SYN that found an
/// `older` connection's entry there (see `MAP_PENDING` in lb-common for the
/// design). Of a handshake in PENDING: an RST goes to its backend, a packet
/// without SYN confirms the flow, which moves to FLOWS. A SYN, retransmitted
/// or not, gets its backend from Maglev, and the flow is recorded (again)
/// in PENDING only (an RST records nothing). Errors as `new_flow`.
// By reference on purpose: the map helpers then get pointers into SCRATCH
// (or the packet's key); by value each key and flow would be copied onto a
// stack that has no room left.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn admit_tcp(
    pkt: &Packet,
    vip_id: u32,
    generation: u32,
    flags: u32,
    older: Older,
) -> Result<u32, Reason> {
    let dsr = flags & VIP_F_DSR != 0;
    // A SYN of a handshake in PENDING (a retransmit) is no new flow for the
    // rate limit, but its backend comes from the table like any SYN's.
    let mut retransmit = false;
    // SAFETY: LRU entries are written whole by this program.
    if let Some(p) = unsafe { PENDING.get(&pkt.key) }
        && p.direction == FLOW_TO_BACKEND
        && p.vip_id == vip_id
        && p.vip_generation == generation
        && let Some(b) = BACKENDS.get(p.backend_id)
        && b.flags & BACKEND_F_VALID != 0
    {
        let backend_id = p.backend_id;
        if pkt.tcp_flags & TCP_SYN != 0 {
            retransmit = true;
        } else if pkt.tcp_flags & TCP_RST != 0 {
            return Ok(backend_id);
        } else {
            // The client answered the SYN-ACK: a real connection.
            let s = scratch()?;
            s.flow = *p;
            if dsr {
                let _ = FLOWS.insert(&pkt.key, &s.flow, 0);
                flows::written(&pkt.key);
                let _ = PENDING.remove(&pkt.key);
                return Ok(backend_id);
            }
            reply_key(pkt, b, &mut s.reply);
            let _ = FLOWS.insert(&pkt.key, &s.flow, 0);
            flows::written(&pkt.key);
            s.flow.direction = FLOW_TO_CLIENT;
            flows::insert_reply(&s.reply, &s.flow);
            let _ = PENDING.remove(&pkt.key);
            let _ = PENDING.remove(&s.reply);
            return Ok(backend_id);
        }
    }
    if !retransmit {
        checks::new_flow_rate(pkt)?;
    }
    let (backend_id, backend) = choose(vip_id, &pkt.key, flags)?;
    older.settle(&pkt.key, backend_id);
    let s = scratch()?;
    if dsr {
        // As below, without a reply direction: the backend answers the client.
        if pkt.tcp_flags & TCP_RST == 0 {
            client_flow(pkt, vip_id, backend_id, generation, &mut s.flow);
            let _ = PENDING.insert(&pkt.key, &s.flow, 0);
        }
        return Ok(backend_id);
    }
    reply_key(pkt, backend, &mut s.reply);
    if reply_collides(&FLOWS, pkt, &s.reply, &mut s.other)
        || reply_collides(&PENDING, pkt, &s.reply, &mut s.other)
    {
        return Err(Reason::DropReplyCollision);
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        // Ends whatever it belongs to: forwarded, nothing to remember.
        return Ok(backend_id);
    }
    client_flow(pkt, vip_id, backend_id, generation, &mut s.flow);
    let _ = PENDING.insert(&pkt.key, &s.flow, 0);
    s.flow.direction = FLOW_TO_CLIENT;
    let _ = PENDING.insert(&s.reply, &s.flow, 0);
    Ok(backend_id)
}

/// Whether `table` holds another VIP's live flow with the same reply
/// 5-tuple. Only the destination is translated, so the same client address
/// and port connected to two VIPs that land on the same backend make the
/// same reply 5-tuple (and the same connection, as far as the backend can
/// tell). Writing ours would send the other connection's replies from the
/// wrong VIP: refuse, unless that connection is gone. `other` is room for
/// that connection's client key.
#[inline(always)]
fn reply_collides(
    table: &LruHashMap<FlowKey, Flow>,
    pkt: &Packet,
    reply: &FlowKey,
    other: &mut FlowKey,
) -> bool {
    // SAFETY: LRU entries are written whole by this program.
    match unsafe { table.get(reply) } {
        Some(old) => {
            old.direction == FLOW_TO_CLIENT
                && (old.vip_addr != pkt.key.dst || old.vip_port != pkt.key.dport)
                && other_flow_is_live(table, pkt, old, other)
        }
        None => false,
    }
}

/// Whether the connection a reply entry `old` belongs to still stands: its
/// client direction is in `table` and valid under its VIP's generation.
/// (Runs only on a collision, so it costs the common path nothing.)
// By reference on purpose: the map helpers then get pointers into SCRATCH
// (or the packet's key); by value each key and flow would be copied onto a
// stack that has no room left.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn other_flow_is_live(
    table: &LruHashMap<FlowKey, Flow>,
    pkt: &Packet,
    old: &Flow,
    client_key: &mut FlowKey,
) -> bool {
    client_key.src = pkt.key.src;
    client_key.dst = old.vip_addr;
    client_key.sport = pkt.key.sport;
    client_key.dport = old.vip_port;
    client_key.proto = pkt.key.proto;
    client_key.family = pkt.key.family;
    client_key.pad = [0; 2];
    // SAFETY: as above.
    let Some(client) = (unsafe { table.get(&*client_key) }) else {
        return false;
    };
    client.direction == FLOW_TO_BACKEND
        && VIP_STATE
            .get(client.vip_id)
            .is_some_and(|s| s.generation == client.vip_generation)
}

/// Maglev lookup: `ring[flow_hash % size]` (`source_hash` for a VIP with
/// `VIP_F_HASH_SOURCE`).
#[inline(always)]
fn pick_backend(vip_id: u32, key: &FlowKey, flags: u32) -> Option<u32> {
    // SAFETY: RINGS has no prealloc: userspace replaces a ring as a new element
    // under RCU, so this reference stays a complete, consistent table.
    let ring = unsafe { RINGS.get(vip_id)? };
    let size = ring.size;
    if size == 0 {
        return None;
    }
    let hash = if flags & VIP_F_HASH_SOURCE != 0 {
        source_hash(key)
    } else {
        flow_hash(key)
    };
    let idx = hash % size;
    ring.entries.get(idx as usize).copied()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
