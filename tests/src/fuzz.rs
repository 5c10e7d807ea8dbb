//! Mutation fuzzing for the packet-level tests (`tests/fuzz.rs`,
//! `tests/decap.rs`): a seeded generator, mutations of valid frames, and
//! what a frame a program sent on must satisfy against the one it was given
//! ([`check_forwarded`]), judged by etherparse's strict parser and
//! checksums computed from scratch. It is how "a malformed packet is
//! dropped or passed, never forwarded half-parsed" is tested as a class
//! rather than case by case.

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::csum::checksum;

/// xorshift64*: deterministic, so a failure names a case that replays.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift stays at 0).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.bits() as u8
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.bits() % 100 < percent
    }
}

/// The cases of a fuzzing run, and those that broke its rules.
#[derive(Debug, Default)]
pub struct Failures {
    runs: usize,
    broken: Vec<String>,
}

impl Failures {
    /// Records one case, `input` run to `output` with `verdict`; `what` names it.
    pub fn record(&mut self, what: &str, verdict: Result<(), String>, input: &[u8], output: &[u8]) {
        self.runs += 1;
        if let Err(e) = verdict {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let (i, o) = (hex(input), hex(output));
            self.broken
                .push(format!("{what}: {e}\n  in:  {i}\n  out: {o}"));
        }
    }

    /// Cases recorded.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// Fails with how many cases broke the rules, and the first eight.
    #[track_caller]
    pub fn assert_none(&self) {
        assert!(
            self.broken.is_empty(),
            "{} of {} frames broke the rules; the first:\n{}",
            self.broken.len(),
            self.runs,
            self.broken[..self.broken.len().min(8)].join("\n")
        );
    }
}

const ETH: usize = 14;
/// Bytes the mutations aim at: Ethernet, the largest IP header, a TCP header.
const HEADERS: usize = ETH + 60 + 60;

/// `base` (an untagged Ethernet frame) with one to three random changes,
/// aimed mostly at the headers; then, usually, its IPv4 header checksum and
/// often its TCP/UDP/ICMP checksum made right again, so that a mutation
/// gets past the checksum checks to the code behind them.
pub fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    for _ in 0..=rng.below(3) {
        mutate_once(rng, &mut f);
    }
    if rng.chance(70) {
        fix_ipv4_header_checksum(&mut f);
    }
    if rng.chance(50) {
        fix_l4_checksum(&mut f);
    }
    f
}

fn mutate_once(rng: &mut Rng, f: &mut Vec<u8>) {
    let v4 = f.len() > ETH + 20 && f[12..14] == [0x08, 0x00];
    let ihl = if v4 {
        usize::from(f[ETH] & 0x0f) * 4
    } else {
        40
    };
    let l4 = ETH + ihl.max(20);
    match rng.below(9) {
        0 if f.len() > ETH => {
            let at = rng.below(f.len().min(HEADERS));
            f[at] = rng.byte();
        }
        1 => {
            let at = rng.below(f.len());
            f[at] ^= 1 << rng.below(8);
        }
        2 if f.len() > ETH + 1 => f.truncate(ETH + rng.below(f.len() - ETH)),
        3 => (0..=rng.below(64)).for_each(|_| f.push(rng.byte())),
        4 => {
            // The IP length field: small, near the truth, or anything.
            let at = if v4 { ETH + 2 } else { ETH + 4 };
            let truth = f.len().saturating_sub(ETH + if v4 { 0 } else { 40 });
            let len = match rng.below(3) {
                0 => rng.below(48),
                1 => (truth + rng.below(9)).saturating_sub(4),
                _ => usize::from(rng.byte()) << 8 | usize::from(rng.byte()),
            };
            put16(f, at, len as u16);
        }
        5 => {
            // IHL, or the TCP data offset.
            if v4 && rng.chance(50) {
                f[ETH] = 0x40 | (rng.byte() & 0x0f);
            } else if f.len() > l4 + 12 {
                f[l4 + 12] = rng.byte() & 0xf0;
            }
        }
        6 => {
            let protos = [0, 1, 4, 6, 17, 41, 43, 44, 58, 60, 59, 255];
            let at = if v4 { ETH + 9 } else { ETH + 6 };
            if f.len() > at {
                f[at] = protos[rng.below(protos.len())];
            }
        }
        7 if v4 => {
            // Fragment flags and offset.
            let v = [0x2000u16, 0x0001, 0x4000, 0x8000, 0x3fff][rng.below(5)];
            put16(f, ETH + 6, v);
        }
        _ => {
            // The UDP length field, or a port.
            if f.len() > l4 + 6 {
                let at = l4 + 2 * rng.below(3);
                let v = [0u16, 7, 8, 53, 80, 443, 8080, 65535][rng.below(8)];
                put16(f, at, v);
            }
        }
    }
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    if f.len() >= at + 2 {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Makes the IPv4 header checksum right for the header as its IHL says,
/// when the frame holds that header.
pub fn fix_ipv4_header_checksum(f: &mut [u8]) {
    if f.len() < ETH + 20 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = usize::from(f[ETH] & 0x0f) * 4;
    if ihl < 20 || f.len() < ETH + ihl {
        return;
    }
    put16(f, ETH + 10, 0);
    let sum = checksum(&f[ETH..ETH + ihl]);
    put16(f, ETH + 10, sum);
}

/// Makes the TCP, UDP or ICMP checksum right, when etherparse reads the
/// frame (the segment as its IP length says).
pub fn fix_l4_checksum(f: &mut [u8]) {
    let Ok(ip) = inspect(f) else { return };
    let Some(at) = checksum_offset(ip.proto) else {
        return;
    };
    let start = ip.l4;
    if ip.segment.len() < at + 2 {
        return;
    }
    put16(f, start + at, 0);
    let mut seg = ip.segment.clone();
    seg[at..at + 2].copy_from_slice(&[0, 0]);
    let mut sum = checksum(&pseudo_and(&ip, &seg));
    if ip.proto == 17 && sum == 0 {
        sum = 0xffff;
    }
    put16(f, start + at, sum);
}

fn checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        6 => Some(16),
        17 => Some(6),
        1 | 58 => Some(2),
        _ => None,
    }
}

/// An IP packet as etherparse's strict parser reads it.
#[derive(Debug, Clone)]
pub struct Ip {
    /// The packet, header to its IP length (no Ethernet padding).
    pub ip: Vec<u8>,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Source and destination address bytes.
    pub src: Vec<u8>,
    /// Destination address bytes.
    pub dst: Vec<u8>,
    /// The transport's IP number (past IPv6 extension headers).
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// The transport segment (past extension headers).
    pub segment: Vec<u8>,
    /// Where the segment starts in the frame (or packet) read.
    pub l4: usize,
    /// A fragment (then `segment` is not a whole transport segment).
    pub fragment: bool,
    /// IPv4 header checksum right (IPv6: true).
    pub ip_sum_ok: bool,
    /// Transport checksum right (true for protocols without one here).
    pub l4_sum_ok: bool,
    /// What follows the TCP or UDP header.
    pub payload: Option<Vec<u8>>,
    /// ICMP (v4 or v6) type, for ICMP.
    pub icmp_type: Option<u8>,
}

/// Reads an Ethernet frame strictly (lengths, offsets, extension headers),
/// or says why etherparse refuses it.
pub fn inspect(frame: &[u8]) -> Result<Ip, String> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| e.to_string())?;
    read(frame, &sliced)
}

/// Reads an IP packet (an encapsulated one) strictly.
pub fn inspect_ip(packet: &[u8]) -> Result<Ip, String> {
    let sliced = SlicedPacket::from_ip(packet).map_err(|e| e.to_string())?;
    read(packet, &sliced)
}

/// Where `part` (a subslice of `whole`) starts in `whole`.
fn offset(whole: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

fn read(buf: &[u8], sliced: &SlicedPacket<'_>) -> Result<Ip, String> {
    let (header, payload, v6, src, dst, ttl, ip_sum_ok) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            // Summed over the bytes: etherparse's header drops the reserved flag.
            let sum_ok = checksum(h.slice()) == 0;
            let (src, dst) = (h.source().to_vec(), h.destination().to_vec());
            (h.slice(), v4.payload(), false, src, dst, h.ttl(), sum_ok)
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            let (src, dst) = (h.source().to_vec(), h.destination().to_vec());
            (h.slice(), v6.payload(), true, src, dst, h.hop_limit(), true)
        }
        _ => return Err("not IP".into()),
    };
    let l4 = offset(buf, payload.payload);
    let mut ip = Ip {
        ip: buf[offset(buf, header)..l4 + payload.payload.len()].to_vec(),
        v6,
        src,
        dst,
        proto: payload.ip_number.0,
        ttl,
        segment: payload.payload.to_vec(),
        l4,
        fragment: payload.fragmented,
        ip_sum_ok,
        l4_sum_ok: true,
        payload: None,
        icmp_type: None,
    };
    if ip.fragment {
        return Ok(ip);
    }
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => ip.payload = Some(t.payload().to_vec()),
        Some(TransportSlice::Udp(u)) => ip.payload = Some(u.payload().to_vec()),
        Some(TransportSlice::Icmpv4(i)) => ip.icmp_type = Some(i.type_u8()),
        Some(TransportSlice::Icmpv6(i)) => ip.icmp_type = Some(i.type_u8()),
        _ => {}
    }
    let no_udp_sum = ip.proto == 17 && !ip.v6 && ip.segment.get(6..8) == Some(&[0, 0]);
    if checksum_offset(ip.proto).is_some() && !no_udp_sum {
        ip.l4_sum_ok = checksum(&pseudo_and(&ip, &ip.segment)) == 0;
    }
    Ok(ip)
}

/// The pseudo-header (none for ICMPv4) followed by `segment`.
fn pseudo_and(ip: &Ip, segment: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(40 + segment.len());
    if ip.proto != 1 {
        buf.extend_from_slice(&ip.src);
        buf.extend_from_slice(&ip.dst);
        if ip.v6 {
            buf.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            buf.extend_from_slice(&[0, 0, 0, ip.proto]);
        } else {
            buf.extend_from_slice(&[0, ip.proto]);
            buf.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
    }
    buf.extend_from_slice(segment);
    buf
}

/// Whether `o` is an ICMP error (v4: unreachable, time exceeded, parameter
/// problem; v6: types 1 to 4) to `i`'s source quoting the start of `i`.
fn answers(o: &Ip, i: &Ip) -> bool {
    let error = match (o.v6, o.icmp_type) {
        (false, Some(t)) => matches!(t, 3 | 11 | 12),
        (true, Some(t)) => (1..=4).contains(&t),
        _ => false,
    };
    error && o.dst == i.src && o.segment.len() > 8 && i.ip.starts_with(&o.segment[8..])
}

/// What a frame a program sent on (`output`, out of `input`) must be:
/// `input` whole and well formed (no fragment), `output` well formed, and
/// `output` one of: an ICMP error answering `input` or an echo reply, with
/// right checksums; `input`'s packet encapsulated (IPIP/IP6IP6) with its
/// IP header, payload and checksum's rightness unchanged (an MSS clamp may
/// change TCP options) under a right outer header; or `input` rewritten
/// (NAT, MACs, an ICMP error translated): the same protocol, length and
/// payload, TTL kept or one less but not to 0, no checksum made wrong and
/// none made right, and nothing rewritten whose IPv4 header sum was wrong.
pub fn check_forwarded(input: &[u8], output: &[u8]) -> Result<(), String> {
    let i = inspect(input).map_err(|e| format!("sent on a frame etherparse refuses: {e}"))?;
    if i.fragment {
        return Err("sent on an IP fragment".into());
    }
    let o = inspect(output).map_err(|e| format!("sent a frame etherparse refuses: {e}"))?;
    if o.fragment {
        return Err("sent a fragment".into());
    }
    let sums_ok = |ip: &Ip| ip.ip_sum_ok && ip.l4_sum_ok;
    if answers(&o, &i) || (i.icmp_type == Some(if i.v6 { 128 } else { 8 })) {
        return match sums_ok(&o) || !sums_ok(&i) {
            true => Ok(()),
            false => Err("an answer with a wrong checksum".into()),
        };
    }
    if matches!(o.proto, 4 | 41) && !matches!(i.proto, 4 | 41) {
        return encapsulated(&i, &o);
    }
    rewritten(&i, &o)
}

/// What a frame `lb-decap` changed (`output`, out of `input`) must be:
/// `input` a whole, well-formed IPIP or IP6IP6 packet (right outer IPv4
/// checksum, no fragment, the inner packet of the outer's family tag) and
/// `output` the same MACs, the inner family's ethertype, then the inner
/// packet, nothing of the outer header left.
pub fn check_decapsulated(input: &[u8], output: &[u8]) -> Result<(), String> {
    let outer =
        inspect(input).map_err(|e| format!("decapsulated a frame etherparse refuses: {e}"))?;
    if outer.fragment || !outer.ip_sum_ok {
        return Err("decapsulated a fragment or a wrong outer checksum".into());
    }
    let (version, ether_type) = match outer.proto {
        4 => (4, [0x08, 0x00]),
        41 => (6, [0x86, 0xdd]),
        p => return Err(format!("decapsulated protocol {p}")),
    };
    let header = outer.ip.len() - outer.segment.len();
    if input[12..14] != [0x08, 0x00] && input[12..14] != [0x86, 0xdd] {
        return Err("decapsulated a tagged frame".into());
    }
    if output.len() + header != input.len() || output[..12] != input[..12] {
        return Err("not the input less its outer header, MACs kept".into());
    }
    if output[12..14] != ether_type || outer.segment.first().map(|b| b >> 4) != Some(version) {
        return Err("ethertype or inner version is not the outer's protocol".into());
    }
    if !output[ETH..].starts_with(&outer.segment) {
        return Err("the inner packet changed".into());
    }
    Ok(())
}

fn encapsulated(i: &Ip, o: &Ip) -> Result<(), String> {
    if !o.ip_sum_ok {
        return Err("outer IPv4 header checksum wrong".into());
    }
    let inner = inspect_ip(&o.segment).map_err(|e| format!("inner packet refused: {e}"))?;
    let header = i.ip.len() - i.segment.len();
    if inner.ip.len() != i.ip.len() || inner.ip[..header] != i.ip[..header] {
        return Err("the inner packet's IP header is not the client's".into());
    }
    if inner.payload != i.payload || inner.l4_sum_ok != i.l4_sum_ok {
        return Err("the inner packet's payload or checksum changed".into());
    }
    Ok(())
}

fn rewritten(i: &Ip, o: &Ip) -> Result<(), String> {
    if o.proto != i.proto || o.v6 != i.v6 || o.ip.len() != i.ip.len() {
        return Err(format!(
            "rewritten into another shape: proto {} -> {}, IP length {} -> {}",
            i.proto,
            o.proto,
            i.ip.len(),
            o.ip.len()
        ));
    }
    // Kept (DSR sends the client's packet on untouched, as Katran does, a
    // TTL of 0 too), or one less, to no less than 1.
    if o.ttl != i.ttl && (o.ttl == 0 || o.ttl.checked_add(1) != Some(i.ttl)) {
        return Err(format!("TTL {} -> {}", i.ttl, o.ttl));
    }
    if o.payload != i.payload {
        return Err("payload changed".into());
    }
    if o.l4_sum_ok != i.l4_sum_ok {
        return Err(format!(
            "transport checksum right {} -> {}",
            i.l4_sum_ok, o.l4_sum_ok
        ));
    }
    if i.ip_sum_ok && !o.ip_sum_ok {
        return Err("IPv4 header checksum made wrong".into());
    }
    if !i.ip_sum_ok && o.ip != i.ip {
        return Err("rewrote a packet whose IPv4 header checksum is wrong".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::Frame;
    use lb_userspace::lab::{CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6};

    #[test]
    fn inspect_reads_checksums_and_fixes_make_them_right() {
        for frame in [
            Frame::tcp(CLIENT_V4, VIP_V4, 1000, 80).syn().bytes(),
            Frame::udp(CLIENT_V6, VIP_V6, 1000, 53).bytes(),
        ] {
            let ip = inspect(&frame).unwrap();
            assert!(ip.ip_sum_ok && ip.l4_sum_ok, "{ip:?}");
            let mut bad = frame.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(!inspect(&bad).unwrap().l4_sum_ok);
            fix_l4_checksum(&mut bad);
            assert!(inspect(&bad).unwrap().l4_sum_ok);
            assert!(check_forwarded(&frame, &frame).is_ok());
            assert!(check_forwarded(&frame, &bad).is_err(), "payload changed");
        }
        let mut f = Frame::tcp(CLIENT_V4, VIP_V4, 1000, 80).bytes();
        f[ETH + 8] = 1;
        assert!(!inspect(&f).unwrap().ip_sum_ok);
        fix_ipv4_header_checksum(&mut f);
        assert!(inspect(&f).unwrap().ip_sum_ok);
        f[ETH + 8] = 0;
        fix_ipv4_header_checksum(&mut f);
        let ttl1 = Frame::tcp(CLIENT_V4, VIP_V4, 1000, 80).ttl(1).bytes();
        assert!(check_forwarded(&ttl1, &f).is_err(), "TTL 1 -> 0");
    }

    #[test]
    fn mutations_are_deterministic_and_varied() {
        let base = Frame::tcp(CLIENT_V4, VIP_V4, 1000, 80).syn().bytes();
        let a: Vec<_> = (0..50)
            .scan(Rng::new(7), |r, _| Some(mutate(r, &base)))
            .collect();
        let b: Vec<_> = (0..50)
            .scan(Rng::new(7), |r, _| Some(mutate(r, &base)))
            .collect();
        assert_eq!(a, b);
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 40);
        assert!(a.iter().any(|f| inspect(f).is_err()));
        assert!(a.iter().any(|f| inspect(f).is_ok()));
    }
}
