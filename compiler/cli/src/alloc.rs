//! The `wcc` binary's allocator: the system's, with large blocks backed by transparent huge
//! pages where the kernel offers them on request (`transparent_hugepage` set to `madvise`, the
//! usual default, or `always`).
//!
//! Rewriting and verifying big weights fills weight-sized buffers: a folded weight's pieces,
//! and on verification each tensor the backend loads and the packed copy its matrix products
//! make. Touched 4 KiB page by page, a 64 MiB buffer costs 16k page faults, each charged to the
//! memory cgroup and zeroed on its own; as 2 MiB pages, 32. On the 2.27 GB scale benchmark's
//! default run (26 weights of 64 MiB folded and verified) this took the system time from 5.5 s
//! to 2.8 s. Blocks under `HUGE_FROM` are left alone: they rarely cover a whole huge page, and
//! many small ones would split the heap's mapping.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes are advised to use huge pages.
const HUGE_FROM: usize = 8 << 20;

/// The size of a transparent huge page on x86-64 and (with 4 KiB base pages) aarch64.
const HUGE_PAGE: usize = 2 << 20;

pub struct Allocator;

/// Advises the kernel to back the whole huge pages inside `[ptr, ptr + size)` with huge pages
/// when they are first touched. Advice only: a kernel that declines (THP off, not supported)
/// leaves the block as it is.
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HUGE_FROM {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: the range lies inside a block this allocator just handed out; MADV_HUGEPAGE
        // changes how its pages are backed, never their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every call is System's; `advise` only adds advice on the block System returned.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}
