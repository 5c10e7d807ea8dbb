//! Fixed-seed hashes shared by the data plane and the Maglev table builder.
//!
//! The hash is Bob Jenkins' lookup3 exactly as the Linux kernel implements it in
//! `include/linux/jhash.h`, so values can be cross-checked against the kernel.
//! Everything here is allocation- and panic-free so the eBPF program can use it.

use crate::FlowKey;

/// Seed of the per-packet flow hash that picks a Maglev entry. Never change it:
/// kernel and userspace must agree, and a change remaps every unpinned flow.
pub const FLOW_HASH_SEED: u32 = 0x6c62_666c;
/// Seed of the Maglev permutation offset. Never change it: a change reshuffles every table.
pub const MAGLEV_OFFSET_SEED: u32 = 0x6d67_6f66;
/// Seed of the Maglev permutation skip. Never change it: a change reshuffles every table.
pub const MAGLEV_SKIP_SEED: u32 = 0x6d67_736b;

/// Arbitrary start value of the kernel's jhash (`JHASH_INITVAL`).
pub const JHASH_INITVAL: u32 = 0xdead_beef;

/// Kernel `__jhash_mix`: reversibly mixes three words.
#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// Kernel `__jhash_final`: final mixing of three words into `c`.
#[inline(always)]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Word `i` of `words`, or 0 past the end; `get` keeps a panic path out of eBPF code.
#[inline(always)]
fn word(words: &[u32], i: usize) -> u32 {
    words.get(i).copied().unwrap_or(0)
}

/// Kernel `jhash2`: hash of `N` 32-bit words with `seed` (the kernel's `initval`).
///
/// `N` is a constant, so the loop has a fixed trip count the eBPF verifier accepts.
#[inline(always)]
pub fn jhash_words<const N: usize>(words: &[u32; N], seed: u32) -> u32 {
    // The kernel seeds with the length in bytes (`length << 2`).
    let init = JHASH_INITVAL
        .wrapping_add((N as u32).wrapping_shl(2))
        .wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut i = 0;
    // `> 3`, not `>= 3`: the last full block goes through the final mix instead.
    while N - i > 3 {
        a = a.wrapping_add(word(words, i));
        b = b.wrapping_add(word(words, i + 1));
        c = c.wrapping_add(word(words, i + 2));
        mix(&mut a, &mut b, &mut c);
        i += 3;
    }
    let left = N - i;
    if left == 0 {
        return c;
    }
    // Words past the end read as 0, matching the kernel's fall-through switch.
    a = a.wrapping_add(word(words, i));
    if left >= 2 {
        b = b.wrapping_add(word(words, i + 1));
    }
    if left >= 3 {
        c = c.wrapping_add(word(words, i + 2));
    }
    final_mix(&mut a, &mut b, &mut c);
    c
}

/// Little-endian word from up to 4 bytes, missing high bytes zero (the kernel's tail switch).
#[inline(always)]
fn le_tail(bytes: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    for (d, s) in w.iter_mut().zip(bytes) {
        *d = *s;
    }
    u32::from_le_bytes(w)
}

/// Kernel `jhash`: hash of a byte string with `seed`, reading little-endian words
/// (the kernel reads CPU-order words; all our targets are little-endian).
///
/// On a little-endian host `jhash_bytes` of `4 * N` bytes equals `jhash_words` of
/// the same memory as `N` words, as in the kernel. The loop bound depends on the
/// data, so this is meant for userspace.
pub fn jhash_bytes(data: &[u8], seed: u32) -> u32 {
    let init = JHASH_INITVAL
        .wrapping_add(data.len() as u32)
        .wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut rest = data;
    while rest.len() > 12 {
        let (block, tail) = rest.split_at(12);
        a = a.wrapping_add(le_tail(&block[0..4]));
        b = b.wrapping_add(le_tail(&block[4..8]));
        c = c.wrapping_add(le_tail(&block[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = tail;
    }
    if rest.is_empty() {
        return c;
    }
    let (ra, rest) = rest.split_at(rest.len().min(4));
    let (rb, rc) = rest.split_at(rest.len().min(4));
    a = a.wrapping_add(le_tail(ra));
    b = b.wrapping_add(le_tail(rb));
    c = c.wrapping_add(le_tail(rc));
    final_mix(&mut a, &mut b, &mut c);
    c
}

/// Flow hash of a 5-tuple: `jhash_words` of the whole 40-byte key as 10 words, seed `FLOW_HASH_SEED`.
///
/// The words are the key's memory read little-endian, field by field, so kernel and
/// userspace get the same value without reinterpreting the struct.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    hash_with_sport(key, key.sport)
}

/// Hash of a 5-tuple without its source port (as `flow_hash` of the key
/// with `sport` 0): the same for every flow of a client to one VIP
/// (`VIP_F_HASH_SOURCE`).
#[inline(always)]
pub fn source_hash(key: &FlowKey) -> u32 {
    hash_with_sport(key, 0)
}

/// `flow_hash` with `sport` in place of the key's: no copy of the key (the
/// eBPF program's stack has no room for one).
#[inline(always)]
fn hash_with_sport(key: &FlowKey, sport: u16) -> u32 {
    // Addresses are already words in memory order; reading them little-endian
    // (a no-op on little-endian machines) keeps the definition byte-exact.
    let s = key.src.map(|w| u32::from_le_bytes(w.to_ne_bytes()));
    let d = key.dst.map(|w| u32::from_le_bytes(w.to_ne_bytes()));
    let words: [u32; 10] = [
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
        (sport as u32) | ((key.dport as u32) << 16),
        u32::from_le_bytes([key.proto, key.family, key.pad[0], key.pad[1]]),
    ];
    jhash_words(&words, FLOW_HASH_SEED)
}

/// Stable identity of a backend that keys its Maglev permutation: address, port (big-endian), family, 0.
#[inline(always)]
pub fn backend_identity(addr: &[u8; 16], port: u16, family: u8) -> [u8; 20] {
    let mut id = [0u8; 20];
    let (a, rest) = id.split_at_mut(16);
    a.copy_from_slice(addr);
    let p = port.to_be_bytes();
    rest[0] = p[0];
    rest[1] = p[1];
    rest[2] = family;
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values computed by a C copy of the kernel's include/linux/jhash.h
    // (jhash/jhash2 with the __jhash_mix/__jhash_final macros) compiled with gcc.
    #[test]
    fn jhash_words_vectors() {
        assert_eq!(jhash_words(&[], 0), 0xdead_beef);
        assert_eq!(jhash_words(&[1], 0), JW1);
        assert_eq!(jhash_words(&[1, 2, 3], 0), JW3);
        assert_eq!(jhash_words(&[1, 2, 3, 4], 0x1234_5678), JW4);
        assert_eq!(
            jhash_words(&[0xdead_beef, 0, 0xffff_ffff, 7, 8, 9, 10], 42),
            JW7
        );
        assert_eq!(jhash_words(&[0u32; 10], FLOW_HASH_SEED), JW10);
    }

    #[test]
    fn jhash_bytes_vectors() {
        assert_eq!(jhash_bytes(b"", 0), 0xdead_beef);
        assert_eq!(jhash_bytes(b"a", 0), JB1);
        assert_eq!(jhash_bytes(b"hello world", 0), JB11);
        assert_eq!(jhash_bytes(b"hello world!", 7), JB12);
        assert_eq!(
            jhash_bytes(b"The quick brown fox jumps over the lazy dog", 0),
            JB43
        );
    }

    #[test]
    fn jhash_bytes_agrees_with_words_on_aligned_input() {
        // jhash counts bytes and jhash2 counts words (then shifts by 2), so on
        // word-aligned little-endian input the kernel's two functions agree.
        fn check<const N: usize>(words: [u32; N], seed: u32) {
            let mut bytes = [0u8; 64];
            for (i, w) in words.iter().enumerate() {
                bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
            assert_eq!(
                jhash_words(&words, seed),
                jhash_bytes(&bytes[..4 * N], seed)
            );
        }
        check([], 3);
        check([0x0403_0201], 0);
        check([1, 2], 9);
        check([1, 2, 3], 9);
        check([1, 2, 3, 4, 5, 6], 0xffff_ffff);
        check([7; 10], FLOW_HASH_SEED);
        check([0x8000_0001; 13], 5);
        // Different lengths of the same prefix must not collide trivially.
        assert_ne!(jhash_bytes(&[0; 4], 0), jhash_bytes(&[0; 5], 0));
    }

    #[test]
    fn source_hash_ignores_only_the_source_port() {
        let key = |sport: u16, src: u32| FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x0164_12c6, 0, 0, 0],
            sport,
            dport: 80,
            proto: 6,
            family: crate::FAMILY_V4,
            pad: [0; 2],
        };
        let one = source_hash(&key(40000, 0x0201_12c6));
        for sport in [0, 1, 1024, 65535] {
            assert_eq!(source_hash(&key(sport, 0x0201_12c6)), one);
        }
        assert_eq!(one, flow_hash(&key(0, 0x0201_12c6)));
        assert_ne!(source_hash(&key(40000, 0x0301_12c6)), one, "another client");
        assert_ne!(flow_hash(&key(40000, 0x0201_12c6)), one);
    }

    #[test]
    fn flow_hash_reads_key_memory_little_endian() {
        let key = FlowKey {
            src: crate::addr_from_bytes([10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            dst: crate::addr_from_bytes([198, 18, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            sport: 40000,
            dport: 80,
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            pad: [0; 2],
        };
        // Serialise the key the way the kernel lays it out (little-endian ports).
        let mut mem = [0u8; 40];
        mem[..16].copy_from_slice(&crate::addr_to_bytes(&key.src));
        mem[16..32].copy_from_slice(&crate::addr_to_bytes(&key.dst));
        mem[32..34].copy_from_slice(&key.sport.to_le_bytes());
        mem[34..36].copy_from_slice(&key.dport.to_le_bytes());
        mem[36] = key.proto;
        mem[37] = key.family;
        assert_eq!(flow_hash(&key), jhash_bytes(&mem, FLOW_HASH_SEED));
        assert_eq!(flow_hash(&key), FLOW_GOLDEN);
        let mut other = key;
        other.sport += 1;
        assert_ne!(flow_hash(&key), flow_hash(&other));
    }

    #[test]
    fn backend_identity_layout() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 2, 11]);
        let id = backend_identity(&addr, 8080, crate::FAMILY_V4);
        assert_eq!(&id[..4], &[198, 18, 2, 11]);
        assert_eq!(&id[4..16], &[0; 12]);
        assert_eq!(&id[16..], &[0x1f, 0x90, 4, 0]);
    }

    #[test]
    fn seeds_are_distinct() {
        assert_ne!(FLOW_HASH_SEED, MAGLEV_OFFSET_SEED);
        assert_ne!(FLOW_HASH_SEED, MAGLEV_SKIP_SEED);
        assert_ne!(MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED);
    }

    const JW1: u32 = 0x72a8_2a9b;
    const JW3: u32 = 0xa461_58f5;
    const JW4: u32 = 0x2d00_1f70;
    const JW7: u32 = 0x19c6_800b;
    const JW10: u32 = 0x063e_9677;
    const JB1: u32 = 0x58d6_8708;
    const JB11: u32 = 0x4aa9_4e65;
    const JB12: u32 = 0x17db_05d9;
    const JB43: u32 = 0x64a2_cd46;
    const FLOW_GOLDEN: u32 = 0xfd9e_ca86;
}
