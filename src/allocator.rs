//! The binary's global allocator (feature `mimalloc`, on by default): mimalloc, plus the two
//! things it does not do by itself for a server that holds many idle connections (issue 19,
//! item 4: 1 KiB of RSS per idle connection).
//!
//! 1. **Task blocks.** tokio aligns every task to 128 bytes (its header is padded to a cache
//!    line pair), so a connection's session task asks for 384 bytes aligned to 128. mimalloc
//!    serves an aligned request whose size is not a power of two by over-allocating
//!    (384 + 127 bytes: a 512-byte block), which is 128 bytes of every connection's memory
//!    spent on padding. Requests of that shape ([`pooled`]) are carved here instead, from
//!    64 KiB chunks, at their exact size: a multiple of 128 laid end to end from an aligned
//!    start stays aligned. A freed block goes on its size's free list and is the next one
//!    handed out. Chunks are never given back: the pool keeps its peak (384 bytes per
//!    session that was open at the busiest moment), the trade for not paying 128 bytes on
//!    every connection.
//! 2. **Idle memory back to the system.** mimalloc returns freed pages to the OS lazily, from
//!    inside later allocations; a server that goes quiet after a wave of handshakes (each one
//!    a few KiB of HTTP buffers, freed after the upgrade) makes none, so those pages stay
//!    resident. [`worker_parks`] runs when a worker thread is about to sleep and, at most once
//!    a second per thread, asks mimalloc to collect that thread's heap: it frees pages whose
//!    blocks are all free and returns those that have been free for a while. When the
//!    thread's previous sleep was long (a quiet server), the collection is forced: it also
//!    visits full pages and returns every free page of every arena at once, ignoring
//!    mimalloc's purge delay. That walks the whole heap, which a busy server should not pay
//!    between bursts ([`worker_unparks`] measures the sleeps).
//!
//! The only module with `unsafe` code: a global allocator cannot be written without it.
//! Everything else in the crate denies it (tests/layers_test.rs checks that no other file
//! allows it).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;

/// The alignment whose non-power-of-two sizes are pooled: tokio's task alignment.
const ALIGN: usize = 128;
/// Largest pooled size. Above it a request's padding is a small part of its block.
const MAX_POOLED: usize = 1024;
/// Bytes asked from mimalloc at a time for a size's blocks (a power of two, so the chunk
/// itself is aligned).
const CHUNK: usize = 64 * 1024;
/// How often a worker that goes idle asks mimalloc to return memory, at most.
const COLLECT_EVERY: Duration = Duration::from_secs(1);
/// A sleep at least this long means a quiet server: the next collection is forced.
const QUIET: Duration = Duration::from_millis(250);

/// mimalloc, with 128-aligned blocks of 384, 640, 768 and 896 bytes served from [`Pools`].
pub struct Allocator;

/// Whether a layout is served by the pools: aligned to exactly [`ALIGN`], a multiple of it
/// that is not a power of two (mimalloc serves powers of two aligned, at their size), and at
/// most [`MAX_POOLED`].
fn pooled(layout: Layout) -> bool {
    let size = layout.size();
    layout.align() == ALIGN
        && size <= MAX_POOLED
        && size.is_multiple_of(ALIGN)
        && !size.is_power_of_two()
        && size > 0
}

/// One size's blocks: a free list threaded through the freed blocks (each holds the address
/// of the next, 0 ends it) and the unused tail of the newest chunk. Addresses as `usize`, so
/// the state is plainly `Send`.
struct Pool {
    free: usize,
    next: usize,
    end: usize,
}

/// A pool's lock on a cache line pair of its own, so that workers taking blocks of different
/// sizes do not bounce one line between cores.
#[repr(align(128))]
struct Padded(Mutex<Pool>);

/// One pool per multiple of [`ALIGN`] up to [`MAX_POOLED`] (index `size / ALIGN`; the powers
/// of two and 0 stay unused). One lock per size for all threads: taken once per task spawned
/// and once per task ended (not per message), and a new chunk (one allocation from mimalloc
/// per 170 sessions) is taken under it.
static POOLS: [Padded; MAX_POOLED / ALIGN + 1] = [const {
    Padded(Mutex::new(Pool {
        free: 0,
        next: 0,
        end: 0,
    }))
}; MAX_POOLED / ALIGN + 1];

impl Pool {
    /// A block of `size` bytes, aligned to [`ALIGN`]; null if a new chunk cannot be had.
    ///
    /// # Safety
    /// `size` is the pool's size, a multiple of [`ALIGN`] of at most [`MAX_POOLED`].
    unsafe fn take(&mut self, size: usize) -> *mut u8 {
        if self.free != 0 {
            let block = self.free as *mut u8;
            // SAFETY: every address on the free list is a block of this pool that was freed
            // and holds the next address in its first word (written by `give`).
            self.free = unsafe { block.cast::<usize>().read() };
            return block;
        }
        if self.end - self.next < size {
            // SAFETY: CHUNK and ALIGN are nonzero powers of two, so the layout is valid.
            let chunk = unsafe { MiMalloc.alloc(Layout::from_size_align_unchecked(CHUNK, ALIGN)) };
            if chunk.is_null() {
                return chunk;
            }
            self.next = chunk as usize;
            self.end = self.next + CHUNK;
        }
        let block = self.next as *mut u8;
        self.next += size;
        block
    }

    /// Puts a block back on the free list.
    ///
    /// # Safety
    /// `block` came from `take` on this pool and is no longer used.
    unsafe fn give(&mut self, block: *mut u8) {
        // SAFETY: the block is ours again, at least 384 bytes and aligned for a `usize`.
        unsafe { block.cast::<usize>().write(self.free) };
        self.free = block as usize;
    }
}

fn pool(size: usize) -> std::sync::MutexGuard<'static, Pool> {
    POOLS[size / ALIGN]
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

// SAFETY: every block handed out is either mimalloc's (for layouts that are not `pooled`) or
// a distinct, aligned `size`-byte range of a chunk that is never freed; `dealloc` and
// `realloc` tell the two apart by the layout, which the caller must pass unchanged.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if pooled(layout) {
            // SAFETY: `pooled` checked the size.
            unsafe { pool(layout.size()).take(layout.size()) }
        } else {
            // SAFETY: forwarded with the caller's own guarantees.
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if pooled(layout) {
            // SAFETY: as in `alloc`; a non-null block has `layout.size()` writable bytes.
            unsafe {
                let block = self.alloc(layout);
                if !block.is_null() {
                    block.write_bytes(0, layout.size());
                }
                block
            }
        } else {
            // SAFETY: forwarded with the caller's own guarantees.
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if pooled(layout) {
            // SAFETY: the same layout allocated it, so it is this pool's block.
            unsafe { pool(layout.size()).give(ptr) }
        } else {
            // SAFETY: forwarded with the caller's own guarantees.
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with the same alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !pooled(layout) && !pooled(new_layout) {
            // SAFETY: forwarded with the caller's own guarantees.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        // SAFETY: a fresh block for the new layout, the common prefix copied, the old one
        // freed through the path that allocated it.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            moved
        }
    }
}

/// A worker thread's sleeps, as its park and unpark hooks see them.
#[derive(Clone, Copy)]
struct Sleeps {
    /// When the current (or last) sleep began.
    parked_at: Option<Instant>,
    /// How long the last finished sleep lasted.
    last: Duration,
    /// When this thread last asked mimalloc to collect.
    collected_at: Option<Instant>,
}

thread_local! {
    static SLEEPS: Cell<Sleeps> = const {
        Cell::new(Sleeps {
            parked_at: None,
            last: Duration::ZERO,
            collected_at: None,
        })
    };
}

/// Called by each worker thread as it is about to sleep (tokio's `on_thread_park`): at most
/// once per [`COLLECT_EVERY`], collect this thread's heap so that pages freed since return to
/// the system, forced when its last sleep lasted [`QUIET`] or more. Returns whether it
/// collected, and whether forced. Cheap when it does nothing (a clock read); a busy worker
/// parks between bursts and so still collects (unforced) about once a second.
pub fn worker_parks() -> Option<bool> {
    let now = Instant::now();
    let mut sleeps = SLEEPS.get();
    sleeps.parked_at = Some(now);
    let due = sleeps
        .collected_at
        .is_none_or(|at| now.duration_since(at) >= COLLECT_EVERY);
    let force = sleeps.last >= QUIET;
    if due {
        sleeps.collected_at = Some(now);
    }
    SLEEPS.set(sleeps);
    if !due {
        return None;
    }
    // SAFETY: `mi_collect` takes no pointers; it walks this thread's heap (and, forced, every
    // arena's free pages).
    unsafe { libmimalloc_sys::mi_collect(force) };
    Some(force)
}

/// Called by each worker thread as it wakes (tokio's `on_thread_unpark`): notes how long it
/// slept, which decides whether its next collection is forced.
pub fn worker_unparks() {
    let mut sleeps = SLEEPS.get();
    if let Some(at) = sleeps.parked_at {
        sleeps.last = at.elapsed();
    }
    SLEEPS.set(sleeps);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, ALIGN).unwrap()
    }

    #[test]
    fn only_aligned_sizes_that_are_not_powers_of_two_are_pooled() {
        for size in [384, 640, 768, 896] {
            assert!(pooled(layout(size)), "{size}");
        }
        for size in [128, 256, 512, 1024, 1152] {
            assert!(!pooled(layout(size)), "{size}");
        }
        assert!(!pooled(Layout::from_size_align(384, 64).unwrap()));
        assert!(!pooled(Layout::from_size_align(384, 8).unwrap()));
    }

    #[test]
    fn a_pool_lays_its_blocks_end_to_end_aligned_and_distinct() {
        // A pool of its own, so other tests' blocks cannot come in between.
        let mut pool = Pool {
            free: 0,
            next: 0,
            end: 0,
        };
        let size = 384;
        let blocks: Vec<*mut u8> = (0..1000).map(|_| unsafe { pool.take(size) }).collect();
        let mut addresses: Vec<usize> = blocks.iter().map(|&b| b as usize).collect();
        for &a in &addresses {
            assert_ne!(a, 0);
            assert_eq!(a % ALIGN, 0, "misaligned block {a:#x}");
        }
        addresses.sort_unstable();
        for pair in addresses.windows(2) {
            assert!(pair[1] - pair[0] >= size, "overlapping blocks");
        }
        // Within a chunk, neighbours are exactly one block apart: no padding between them
        // (1000 blocks take 6 chunks of 170).
        let exact = addresses.windows(2).filter(|p| p[1] - p[0] == size).count();
        assert!(
            exact >= 1000 - 6,
            "only {exact} of 999 neighbours are 384 bytes apart"
        );
        for (i, &b) in blocks.iter().enumerate() {
            unsafe { b.write_bytes(i as u8, size) };
        }
        for (i, &b) in blocks.iter().enumerate() {
            let bytes = unsafe { std::slice::from_raw_parts(b, size) };
            assert!(
                bytes.iter().all(|&x| x == i as u8),
                "block {i} was overwritten"
            );
        }
        // Freed blocks come back last in, first out, before any new chunk.
        unsafe {
            pool.give(blocks[3]);
            pool.give(blocks[7]);
            assert_eq!(pool.take(size), blocks[7]);
            assert_eq!(pool.take(size), blocks[3]);
        }
    }

    #[test]
    fn realloc_moves_between_pooled_and_mimalloc_blocks_keeping_the_bytes() {
        unsafe {
            let a = Allocator.alloc_zeroed(layout(384));
            assert!(std::slice::from_raw_parts(a, 384).iter().all(|&x| x == 0));
            a.write_bytes(7, 384);
            let b = Allocator.realloc(a, layout(384), 512);
            assert_eq!(b as usize % ALIGN, 0);
            assert!(std::slice::from_raw_parts(b, 384).iter().all(|&x| x == 7));
            let c = Allocator.realloc(b, layout(512), 768);
            assert_eq!(c as usize % ALIGN, 0);
            assert!(std::slice::from_raw_parts(c, 384).iter().all(|&x| x == 7));
            Allocator.dealloc(c, layout(768));
        }
    }

    #[test]
    fn blocks_taken_and_freed_on_many_threads_never_overlap() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let blocks: Vec<usize> = (0..50)
                            .map(|_| unsafe { Allocator.alloc(layout(384)) } as usize)
                            .collect();
                        let mark = (t * 50 + round % 50) as u8;
                        for &b in &blocks {
                            unsafe { (b as *mut u8).write_bytes(mark, 384) };
                        }
                        for &b in &blocks {
                            let bytes = unsafe { std::slice::from_raw_parts(b as *const u8, 384) };
                            assert!(bytes.iter().all(|&x| x == mark), "a block was shared");
                            unsafe { Allocator.dealloc(b as *mut u8, layout(384)) };
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_worker_collects_at_most_once_a_second_and_forces_only_after_a_long_sleep() {
        // A fresh thread: its own record of sleeps.
        std::thread::spawn(|| {
            assert_eq!(
                worker_parks(),
                Some(false),
                "first park: collects, not forced"
            );
            worker_unparks();
            assert_eq!(worker_parks(), None, "again within the second: nothing");
            worker_unparks();
            // A long sleep, then a park once the second has passed: forced.
            let mut sleeps = SLEEPS.get();
            sleeps.parked_at = sleeps.parked_at.map(|at| at - QUIET);
            sleeps.collected_at = sleeps.collected_at.map(|at| at - COLLECT_EVERY);
            SLEEPS.set(sleeps);
            worker_unparks();
            assert_eq!(worker_parks(), Some(true), "after a quiet sleep: forced");
            // A short sleep: the next due collection is not forced.
            worker_unparks();
            let mut sleeps = SLEEPS.get();
            sleeps.collected_at = sleeps.collected_at.map(|at| at - COLLECT_EVERY);
            SLEEPS.set(sleeps);
            assert_eq!(
                worker_parks(),
                Some(false),
                "after a short sleep: not forced"
            );
        })
        .join()
        .unwrap();
    }
}
