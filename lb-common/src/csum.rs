//! Incremental Internet checksum updates (RFC 1624), usable in eBPF.
//!
//! All values are 16-bit words in network order read as numbers: a header's
//! checksum field `[u8; 2]` is `u16::from_be_bytes(field)`. NAT rewrites a few
//! words (addresses, ports, TTL) and patches the checksum with RFC 1624 eqn. 3,
//! `HC' = ~(~HC + ~m + m')`, instead of summing the whole packet again.

/// Folds the carries of a ones'-complement sum once; keeps the value mod 0xffff.
#[inline(always)]
fn fold(s: u32) -> u32 {
    (s & 0xffff) + (s >> 16)
}

/// Accumulated `~m + m'` terms of the words a rewrite changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CsumDelta {
    // Kept below 0x10003 by folding after every word, so it never overflows.
    sum: u32,
}

impl CsumDelta {
    /// An empty delta (no word changed).
    #[inline(always)]
    pub fn new() -> Self {
        CsumDelta { sum: 0 }
    }

    /// Records that the 16-bit word `old` became `new`.
    #[inline(always)]
    pub fn replace_u16(&mut self, old: u16, new: u16) {
        self.sum = fold(self.sum + (!old) as u32 + new as u32);
    }

    /// Records that the bytes `old` became `new`, as big-endian 16-bit words.
    ///
    /// `N` must be even (2, 4, 16 for ports, IPv4 and IPv6 addresses); the words must
    /// start at an even offset of the checksummed data. An odd trailing byte is
    /// ignored; a compile-time check rejects odd `N`.
    #[inline(always)]
    pub fn replace_bytes<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        const {
            assert!(
                N.is_multiple_of(2),
                "replace_bytes needs whole 16-bit words"
            )
        };
        // Fixed N: the loop unrolls, and chunks_exact has no panicking index.
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            if let (&[o0, o1], &[n0, n1]) = (o, n) {
                self.replace_u16(u16::from_be_bytes([o0, o1]), u16::from_be_bytes([n0, n1]));
            }
        }
    }

    /// Returns the checksum field value `check` updated for all recorded changes.
    ///
    /// For UDP pass the result through `udp_checksum_fixup`.
    #[inline(always)]
    pub fn apply(&self, check: u16) -> u16 {
        // The sum is 0 only if every term is 0, which a valid checksum over non-zero
        // data cannot produce, so the result matches a full recompute exactly.
        let s = fold(fold((!check) as u32 + self.sum));
        !(s as u16)
    }
}

/// Maps a computed UDP checksum of 0 to 0xffff, its other ones'-complement form.
///
/// In UDP a transmitted 0 means "no checksum" (allowed over IPv4 only), so callers
/// must leave an IPv4 UDP checksum field of 0 untouched rather than update it, and
/// must send a computed 0 as 0xffff.
#[inline(always)]
pub fn udp_checksum_fixup(c: u16) -> u16 {
    if c == 0 { 0xffff } else { c }
}

/// Full Internet checksum of `data` (RFC 1071): complement of the ones'-complement
/// sum of its big-endian words, an odd trailing byte padded with zero.
///
/// The loop bound depends on the data, so this is for userspace and tests.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        if let &[hi, lo] = w {
            sum += u16::from_be_bytes([hi, lo]) as u64;
        }
    }
    if let &[last] = words.remainder() {
        sum += u16::from_be_bytes([last, 0]) as u64;
    }
    // A u64 of 16-bit words folds to 16 bits in at most four steps.
    for _ in 0..4 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    /// Tiny deterministic PRNG (xorshift64) so the tests need no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        fn u16(&mut self) -> u16 {
            self.next() as u16
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.byte();
            }
        }
    }

    fn get16(buf: &[u8], off: usize) -> u16 {
        u16::from_be_bytes([buf[off], buf[off + 1]])
    }

    fn put16(buf: &mut [u8], off: usize, v: u16) {
        buf[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// Writes the correct IPv4 header checksum into `h`.
    fn seal_ipv4(h: &mut [u8; 20]) {
        put16(h, 10, 0);
        let c = checksum(h);
        put16(h, 10, c);
    }

    fn random_ipv4(rng: &mut XorShift) -> [u8; 20] {
        let mut h = [0u8; 20];
        rng.fill(&mut h);
        h[0] = 0x45;
        h[9] = if rng.byte() & 1 == 0 { 6 } else { 17 };
        seal_ipv4(&mut h);
        h
    }

    /// NATs an IPv4 header (new destination, TTL - 1) incrementally and checks it
    /// against a full recompute.
    fn check_ipv4_nat(mut h: [u8; 20], new_dst: [u8; 4]) {
        assert_eq!(checksum(&h), 0, "input header must be valid");
        let mut d = CsumDelta::new();
        let old_ttl_proto = get16(&h, 8);
        h[8] = h[8].wrapping_sub(1);
        d.replace_u16(old_ttl_proto, get16(&h, 8));
        let old_dst: [u8; 4] = h[16..20].try_into().unwrap();
        h[16..20].copy_from_slice(&new_dst);
        d.replace_bytes(&old_dst, &new_dst);
        let inc = d.apply(get16(&h, 10));
        put16(&mut h, 10, 0);
        assert_eq!(inc, checksum(&h), "header {h:02x?}");
    }

    #[test]
    fn ipv4_header_random() {
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        for _ in 0..20_000 {
            let h = random_ipv4(&mut rng);
            let mut dst = [0u8; 4];
            rng.fill(&mut dst);
            check_ipv4_nat(h, dst);
        }
    }

    #[test]
    fn ipv4_header_edge_sums() {
        let mut rng = XorShift(42);
        for _ in 0..2_000 {
            // Old checksum 0x0000 (sum 0xffff): pick the identification field to get it.
            let mut h = random_ipv4(&mut rng);
            put16(&mut h, 4, 0);
            put16(&mut h, 10, 0);
            let c = checksum(&h);
            put16(&mut h, 4, c);
            // Valid with a checksum field of 0.
            assert_eq!(checksum(&h), 0);
            let mut dst = [0u8; 4];
            rng.fill(&mut dst);
            check_ipv4_nat(h, dst);

            // New checksum 0x0000: pick the last word of the new destination to get it.
            let h = random_ipv4(&mut rng);
            let mut after = h;
            after[8] = after[8].wrapping_sub(1);
            rng.fill(&mut after[16..18]);
            put16(&mut after, 18, 0);
            put16(&mut after, 10, 0);
            let c = checksum(&after);
            let dst = [after[16], after[17], (c >> 8) as u8, c as u8];
            check_ipv4_nat(h, dst);
        }
    }

    #[test]
    fn equivalent_zero_words() {
        // 0x0000 and 0xffff are both zero in ones' complement: swapping them keeps
        // the checksum, and a no-op rewrite changes nothing.
        let mut d = CsumDelta::new();
        d.replace_u16(0, 0xffff);
        assert_eq!(d.apply(0x1234), 0x1234);
        let mut d = CsumDelta::new();
        d.replace_u16(0xffff, 0);
        d.replace_bytes(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(d.apply(0xabcd), 0xabcd);
        assert_eq!(CsumDelta::new().apply(0), 0);
        // Many words at once must not overflow the accumulator.
        let mut d = CsumDelta::new();
        for _ in 0..100_000 {
            d.replace_u16(0, 0xffff);
        }
        assert_eq!(d.apply(0x00ff), 0x00ff);
    }

    #[test]
    fn checksum_reference() {
        // RFC 1071 example: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(checksum(&[0xab]), !0xab00);
        assert_eq!(checksum(&[0xff, 0xff]), 0);
        assert_eq!(udp_checksum_fixup(0), 0xffff);
        assert_eq!(udp_checksum_fixup(1), 1);
        assert_eq!(udp_checksum_fixup(0xffff), 0xffff);
    }

    /// A TCP or UDP segment with its pseudo-header, IPv4 or IPv6.
    struct Segment {
        v6: bool,
        udp: bool,
        src: [u8; 16],
        dst: [u8; 16],
        l4: Vec<u8>,
    }

    impl Segment {
        fn addr_len(&self) -> usize {
            if self.v6 { 16 } else { 4 }
        }
        fn check_off(&self) -> usize {
            if self.udp { 6 } else { 16 }
        }
        /// Checksum over pseudo-header and segment, as the field would carry it.
        fn compute(&self) -> u16 {
            let n = self.addr_len();
            let proto = if self.udp { 17 } else { 6 };
            let mut buf = Vec::new();
            buf.extend_from_slice(&self.src[..n]);
            buf.extend_from_slice(&self.dst[..n]);
            if self.v6 {
                buf.extend_from_slice(&(self.l4.len() as u32).to_be_bytes());
                buf.extend_from_slice(&[0, 0, 0, proto]);
            } else {
                buf.extend_from_slice(&[0, proto]);
                buf.extend_from_slice(&(self.l4.len() as u16).to_be_bytes());
            }
            let mut l4 = self.l4.clone();
            put16(&mut l4, self.check_off(), 0);
            buf.extend_from_slice(&l4);
            let c = checksum(&buf);
            if self.udp { udp_checksum_fixup(c) } else { c }
        }
        fn seal(&mut self) {
            let c = self.compute();
            let off = self.check_off();
            put16(&mut self.l4, off, c);
        }
        fn random(rng: &mut XorShift, v6: bool, udp: bool) -> Self {
            let mut s = Segment {
                v6,
                udp,
                src: [0; 16],
                dst: [0; 16],
                l4: vec![0; if udp { 8 } else { 20 } + (rng.next() % 64) as usize],
            };
            let n = s.addr_len();
            rng.fill(&mut s.src[..n]);
            rng.fill(&mut s.dst[..n]);
            rng.fill(&mut s.l4);
            if udp {
                let len = s.l4.len() as u16;
                put16(&mut s.l4, 4, len);
            }
            s.seal();
            s
        }
        /// Rewrites destination address and port incrementally and checks the
        /// result against a full recompute.
        fn nat_and_check(mut self, new_dst: [u8; 16], new_port: u16) {
            let off = self.check_off();
            let old = get16(&self.l4, off);
            assert_eq!(old, self.compute(), "input segment must be valid");
            let mut d = CsumDelta::new();
            if self.v6 {
                d.replace_bytes(&self.dst, &new_dst);
            } else {
                let o: [u8; 4] = self.dst[..4].try_into().unwrap();
                let n: [u8; 4] = new_dst[..4].try_into().unwrap();
                d.replace_bytes(&o, &n);
            }
            let n = self.addr_len();
            self.dst[..n].copy_from_slice(&new_dst[..n]);
            d.replace_u16(get16(&self.l4, 2), new_port);
            put16(&mut self.l4, 2, new_port);
            let mut inc = d.apply(old);
            if self.udp {
                inc = udp_checksum_fixup(inc);
            }
            assert_eq!(inc, self.compute(), "v6={} udp={}", self.v6, self.udp);
        }
    }

    #[test]
    fn l4_random() {
        let mut rng = XorShift(0xfeed_face_cafe_beef);
        for i in 0..20_000 {
            let s = Segment::random(&mut rng, i & 1 == 1, i & 2 == 2);
            let mut dst = [0u8; 16];
            rng.fill(&mut dst);
            let port = rng.u16();
            s.nat_and_check(dst, port);
        }
    }

    #[test]
    fn l4_edge_sums() {
        let mut rng = XorShift(7);
        for i in 0..4_000 {
            let (v6, udp) = (i & 1 == 1, i & 2 == 2);
            // Old sum 0xffff (TCP field 0, UDP field 0xffff): choose the source port.
            let mut s = Segment::random(&mut rng, v6, udp);
            put16(&mut s.l4, 0, 0);
            let c = s.compute();
            let c = if udp && c == 0xffff { 0 } else { c };
            put16(&mut s.l4, 0, c);
            s.seal();
            assert_eq!(get16(&s.l4, s.check_off()), if udp { 0xffff } else { 0 });
            let mut dst = [0u8; 16];
            rng.fill(&mut dst);
            let port = rng.u16();
            s.nat_and_check(dst, port);

            // New sum 0xffff: choose the new destination port.
            let s = Segment::random(&mut rng, v6, udp);
            let mut dst = [0u8; 16];
            rng.fill(&mut dst);
            let mut probe = Segment {
                v6,
                udp,
                src: s.src,
                dst,
                l4: s.l4.clone(),
            };
            put16(&mut probe.l4, 2, 0);
            let c = probe.compute();
            let port = if udp && c == 0xffff { 0 } else { c };
            s.nat_and_check(dst, port);
        }
    }
}
