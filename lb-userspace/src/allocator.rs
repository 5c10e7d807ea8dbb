//! The global allocator of the binaries: mimalloc, called by the entry points
//! whose fast paths fit what Rust asks for.
//!
//! The `mimalloc` crate sends every allocation to `mi_malloc_aligned`. For a
//! block over 1 KiB, or one whose alignment is above its size class's
//! natural one (tokio's task cells are 128-byte aligned), that takes
//! mimalloc's over-allocating aligned path: some 200 to 700 instructions
//! where `mi_malloc` needs a few dozen, several times per proxied request.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// Every mimalloc block is aligned to this (its sizes are multiples of a word).
const WORD: usize = 8;

/// Sizes up to this that are powers of two get blocks aligned to their size
/// (mimalloc's `MI_PAGE_MAX_START_BLOCK_ALIGN2`).
const NATURAL_ALIGN_MAX: usize = 4096;

/// mimalloc, entered through `mi_malloc` when word alignment suffices.
pub struct Allocator;

/// The size to ask for an over-aligned layout: the next power of two, whose
/// blocks mimalloc aligns naturally, when that is small enough.
fn aligned_size(layout: Layout) -> usize {
    let rounded = layout.size().next_power_of_two().max(layout.align());
    if rounded <= NATURAL_ALIGN_MAX {
        rounded
    } else {
        layout.size()
    }
}

// SAFETY: each method returns memory from mimalloc that satisfies the layout
// (word alignment from mi_malloc, the rest from its aligned calls), and frees
// only what mimalloc handed out.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain C calls with sizes and alignments Rust made valid.
        unsafe {
            if layout.align() <= WORD {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(aligned_size(layout), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in alloc.
        unsafe {
            if layout.align() <= WORD {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(aligned_size(layout), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: ptr came from one of the calls above.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: ptr came from one of the calls above, with this alignment.
        unsafe {
            if layout.align() <= WORD {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 24, 100, 384, 1000, 1500, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is written within its size and freed once.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0);
                    assert_eq!(*grown.add(size - 1), 0xa5, "realloc keeps the bytes");
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
