//! Weighted Maglev lookup table builder (Eisenbud et al., NSDI 2016).
//!
//! Weights follow Katran's MaglevV2: every round each backend adds its weight to a
//! counter and claims its next preferred free entry only when the counter reaches
//! the largest weight, so entries are shared in proportion to weight. The table is
//! a pure function of the set of backends, so every instance builds the same one.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::hash::{MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED, jhash_bytes};

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevInput<'a> {
    /// Value stored in the table for this backend (its backend id).
    pub id: u32,
    /// Stable identity that keys the backend's permutation (see `hash::backend_identity`).
    pub identity: &'a [u8],
    /// Relative share of entries; 0 leaves the backend out.
    pub weight: u32,
}

/// Why a table cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// The size is below 2 (a skip needs `size - 1 >= 1`).
    SizeTooSmall(u32),
    /// The size is above `MAX_RING_SIZE`.
    SizeTooLarge(u32),
    /// The size is not prime, so some permutations would not visit every entry.
    SizeNotPrime(u32),
    /// More backends with non-zero weight than entries.
    TooManyBackends {
        /// Backends with non-zero weight.
        backends: usize,
        /// Requested table size.
        size: u32,
    },
    /// Two backends share an identity (and would share a permutation).
    DuplicateIdentity,
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::SizeTooSmall(n) => write!(f, "Maglev table size {n} is below 2"),
            MaglevError::SizeTooLarge(n) => write!(
                f,
                "Maglev table size {n} is above the maximum {}",
                crate::MAX_RING_SIZE
            ),
            MaglevError::SizeNotPrime(n) => write!(f, "Maglev table size {n} is not prime"),
            MaglevError::TooManyBackends { backends, size } => write!(
                f,
                "{backends} backends do not fit a Maglev table of {size} entries"
            ),
            MaglevError::DuplicateIdentity => {
                write!(f, "two backends have the same identity")
            }
        }
    }
}

/// Whether `n` is prime (trial division; fine for table sizes).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // u64 so `d * d` cannot overflow near u32::MAX.
    let n = n as u64;
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Smallest prime `>= n`; 0 if there is none in `u32` (`n > 4_294_967_291`).
pub fn next_prime(n: u32) -> u32 {
    let mut c = n.max(2);
    loop {
        if is_prime(c) {
            return c;
        }
        match c.checked_add(1) {
            Some(next) => c = next,
            None => return 0,
        }
    }
}

/// Builds a Maglev table of `size` entries holding backend ids.
///
/// Backends with weight 0 are left out; with none left the table is empty. The
/// result does not depend on the order of `backends`.
pub fn build(backends: &[MaglevInput<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if size < 2 {
        return Err(MaglevError::SizeTooSmall(size));
    }
    if size as usize > crate::MAX_RING_SIZE {
        return Err(MaglevError::SizeTooLarge(size));
    }
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime(size));
    }

    // Sorting makes the table independent of input order; ties on identity are
    // only possible as duplicates, which are rejected below.
    let mut sorted: Vec<&MaglevInput<'_>> = backends.iter().filter(|b| b.weight > 0).collect();
    sorted.sort_by(|a, b| a.identity.cmp(b.identity).then(a.id.cmp(&b.id)));
    if sorted.windows(2).any(|w| w[0].identity == w[1].identity) {
        return Err(MaglevError::DuplicateIdentity);
    }
    if sorted.is_empty() {
        return Ok(Vec::new());
    }
    if sorted.len() > size as usize {
        return Err(MaglevError::TooManyBackends {
            backends: sorted.len(),
            size,
        });
    }

    let max_weight = sorted.iter().map(|b| b.weight).max().unwrap_or(1) as u64;
    // Per backend: current permutation position, skip, weight credit.
    let mut pos: Vec<u32> = Vec::with_capacity(sorted.len());
    let mut skip: Vec<u32> = Vec::with_capacity(sorted.len());
    for b in &sorted {
        pos.push(jhash_bytes(b.identity, MAGLEV_OFFSET_SEED) % size);
        skip.push(jhash_bytes(b.identity, MAGLEV_SKIP_SEED) % (size - 1) + 1);
    }
    let mut credit = vec![0u64; sorted.len()];

    // `taken` marks filled entries (ids themselves may take any u32 value); two
    // flat arrays keep the hot loop cache-friendly.
    let mut table: Vec<u32> = vec![0; size as usize];
    let mut taken: Vec<bool> = vec![false; size as usize];
    let mut filled = 0u32;
    // Terminates: each round the heaviest backend claims an entry, and a prime size
    // with skip in 1..size makes each permutation visit every entry.
    while filled < size {
        for (i, b) in sorted.iter().enumerate() {
            credit[i] += b.weight as u64;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let mut p = pos[i];
            while taken[p as usize] {
                p = advance(p, skip[i], size);
            }
            taken[p as usize] = true;
            table[p as usize] = b.id;
            pos[i] = advance(p, skip[i], size);
            filled += 1;
            if filled == size {
                break;
            }
        }
    }
    Ok(table)
}

/// Next position of a permutation: `(p + skip) % size`. Both are below `size`
/// (at most `MAX_RING_SIZE`), so one subtraction replaces the division.
#[inline]
fn advance(p: u32, skip: u32, size: u32) -> u32 {
    let next = p + skip;
    if next >= size { next - size } else { next }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::hash::backend_identity;
    use crate::{DEFAULT_RING_SIZE, FAMILY_V4};
    use std::println;

    fn v4_identity(last: u8, port: u16) -> [u8; 20] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[198, 18, 2, last]);
        backend_identity(&a, port, FAMILY_V4)
    }

    fn identities(n: usize) -> Vec<[u8; 20]> {
        (0..n).map(|i| v4_identity(10 + i as u8, 8080)).collect()
    }

    fn inputs<'a>(ids: &'a [[u8; 20]], weights: &[u32]) -> Vec<MaglevInput<'a>> {
        ids.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (identity, &weight))| MaglevInput {
                id: i as u32,
                identity,
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &e in table {
            c[e as usize] += 1;
        }
        c
    }

    fn fnv1a(table: &[u32]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for e in table {
            for b in e.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(65537));
        assert!(!is_prime(65535));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(u32::MAX));
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(13), 13);
        assert_eq!(next_prime(14), 17);
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(4_294_967_292), 0);
        assert!(is_prime(DEFAULT_RING_SIZE));
        assert!(is_prime(crate::MAX_RING_SIZE as u32));
    }

    #[test]
    fn equal_weights_are_even() {
        let n = 10;
        let ids = identities(n);
        let size = 65537;
        let table = build(&inputs(&ids, &[1; 10]), size).unwrap();
        assert_eq!(table.len(), size as usize);
        let even = size as f64 / n as f64;
        let c = counts(&table, n);
        let worst = c
            .iter()
            .map(|&x| (x as f64 - even).abs() / even)
            .fold(0.0, f64::max);
        println!(
            "equal weights: counts {c:?}, worst deviation {:.4}%",
            worst * 100.0
        );
        for &x in &c {
            assert!((x as f64 - even).abs() <= 0.01 * even, "{c:?}");
        }
    }

    #[test]
    fn weights_are_proportional() {
        let weights = [1, 2, 3, 4];
        let ids = identities(4);
        let size = 65537;
        let table = build(&inputs(&ids, &weights), size).unwrap();
        let c = counts(&table, 4);
        let total: u32 = weights.iter().sum();
        let mut worst = 0.0f64;
        for (&x, &w) in c.iter().zip(&weights) {
            let want = size as f64 * w as f64 / total as f64;
            let err = (x as f64 - want).abs() / want;
            worst = worst.max(err);
            assert!(err <= 0.01, "{c:?}");
        }
        println!(
            "weights 1,2,3,4: counts {c:?}, worst relative error {:.4}%",
            worst * 100.0
        );

        // Weight 0 leaves a backend out entirely.
        let table = build(&inputs(&ids, &[1, 0, 1, 1]), 13).unwrap();
        assert!(!table.contains(&1));
    }

    #[test]
    fn golden_tables() {
        let ids: Vec<[u8; 20]> = (11..=13).map(|i| v4_identity(i, 8080)).collect();
        let input: Vec<MaglevInput<'_>> = ids
            .iter()
            .enumerate()
            .map(|(i, identity)| MaglevInput {
                id: 11 + i as u32,
                identity,
                weight: 1,
            })
            .collect();

        let big = build(&input, 65537).unwrap();
        println!(
            "golden 65537: first 16 {:?}, fnv1a {:#018x}",
            &big[..16],
            fnv1a(&big)
        );
        assert_eq!(&big[..16], &GOLDEN_FIRST16);
        assert_eq!(fnv1a(&big), GOLDEN_FNV);

        let small = build(&input, 13).unwrap();
        println!("golden 13: {small:?}");
        assert_eq!(small, GOLDEN_13);

        // Any input order gives the same table.
        let mut rev = input.clone();
        rev.reverse();
        assert_eq!(build(&rev, 65537).unwrap(), big);
        let rot = [input[1], input[2], input[0]];
        assert_eq!(build(&rot, 13).unwrap(), small);
    }

    /// Fraction of entries that differ between two tables of the same size.
    fn changed(a: &[u32], b: &[u32]) -> f64 {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    }

    #[test]
    fn removal_and_addition_disrupt_little() {
        let n = 10;
        let ids = identities(n + 1);
        let size = 65537;
        let all = inputs(&ids, &[1; 11]);
        let before = build(&all[..n], size).unwrap();

        // Remove backend 3.
        let mut fewer = all[..n].to_vec();
        let removed = fewer.remove(3);
        let after = build(&fewer, size).unwrap();
        for (b, a) in before.iter().zip(&after) {
            if *b == removed.id {
                assert_ne!(a, b);
            }
        }
        let frac = changed(&before, &after);
        println!(
            "remove 1 of {n}: {:.4}% of entries changed (minimal {:.4}%)",
            frac * 100.0,
            100.0 / n as f64
        );
        assert!(frac <= 1.2 / n as f64);

        // Add an 11th backend.
        let grown = build(&all, size).unwrap();
        let frac = changed(&before, &grown);
        println!(
            "add 1 to {n}: {:.4}% of entries changed (minimal {:.4}%)",
            frac * 100.0,
            100.0 / (n + 1) as f64
        );
        assert!(frac <= 1.2 / (n + 1) as f64);
    }

    #[test]
    fn errors() {
        let ids = identities(3);
        let good = inputs(&ids, &[1, 1, 1]);
        assert_eq!(build(&good, 65535), Err(MaglevError::SizeNotPrime(65535)));
        assert_eq!(build(&good, 1), Err(MaglevError::SizeTooSmall(1)));
        assert_eq!(build(&good, 0), Err(MaglevError::SizeTooSmall(0)));
        assert_eq!(build(&good, 65539), Err(MaglevError::SizeTooLarge(65539)));
        assert_eq!(
            build(&good, 2),
            Err(MaglevError::TooManyBackends {
                backends: 3,
                size: 2
            })
        );
        let dup = [good[0], good[1], MaglevInput { id: 7, ..good[0] }];
        assert_eq!(build(&dup, 13), Err(MaglevError::DuplicateIdentity));

        // Nothing to place is not an error: the ring is just empty.
        assert_eq!(build(&[], 13), Ok(Vec::new()));
        assert_eq!(build(&inputs(&ids, &[0, 0, 0]), 13), Ok(Vec::new()));
        // A single backend fills the whole table.
        assert_eq!(build(&good[..1], 13), Ok(vec![0; 13]));
        assert_eq!(build(&good[..2], 2).map(|t| t.len()), Ok(2));

        let msg = std::format!("{}", MaglevError::SizeNotPrime(10));
        assert_eq!(msg, "Maglev table size 10 is not prime");
    }

    const GOLDEN_FIRST16: [u32; 16] = [
        13, 12, 12, 11, 11, 13, 11, 13, 11, 12, 13, 12, 13, 13, 13, 11,
    ];
    const GOLDEN_FNV: u64 = 0x5913_6fef_16e4_aeb8;
    const GOLDEN_13: [u32; 13] = [11, 12, 12, 11, 13, 11, 11, 12, 13, 11, 12, 13, 13];
}
