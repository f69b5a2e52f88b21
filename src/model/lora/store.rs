//! One block of memory for all of an adapter's LoRA weights.
//!
//! A decode step reads each layer's update once, after the layer's base
//! weights have streamed through every cache and pushed its pages out of
//! the TLB. Kept in one block, an adapter's updates lie on few pages; from
//! 256 KiB up (rank-8 q and v on SmolLM2 take 480 KiB), the block starts
//! on a 2 MiB boundary and asks Linux for huge pages, so one TLB entry
//! covers it all.

/// Bytes from which the block asks for huge pages.
const HUGE_FROM: usize = 256 << 10;
/// A huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;
/// A cache line: every block starts on one.
const LINE: usize = 64;

/// A zeroed block of bytes, aligned as the module doc says.
pub struct Store {
    /// The allocation; the block is its bytes from `start` on.
    bytes: Vec<u8>,
    start: usize,
}

impl Store {
    pub fn zeroed(len: usize) -> Self {
        let align = if len >= HUGE_FROM { HUGE_PAGE } else { LINE };
        let span = len.next_multiple_of(align);
        // Never grows past this capacity, so the block never moves.
        let mut bytes: Vec<u8> = Vec::with_capacity(span + align);
        let start = bytes.as_ptr().align_offset(align);
        if align == HUGE_PAGE {
            advise_huge_pages(&mut bytes, start, span);
        }
        bytes.resize(start + len, 0);
        Self { bytes, start }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..]
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({} bytes)", self.bytes().len())
    }
}

/// Asks the kernel to back `span` bytes of `bytes`' capacity from `start`
/// (not yet touched) with huge pages. Only advice: where the kernel does
/// not follow it, the block is ordinary memory.
#[cfg(target_os = "linux")]
fn advise_huge_pages(bytes: &mut Vec<u8>, start: usize, span: usize) {
    assert!(start + span <= bytes.capacity());
    // SAFETY: the range lies inside the Vec's allocation (asserted), and
    // MADV_HUGEPAGE changes no contents and no mapping the Vec relies on.
    unsafe {
        libc::madvise(
            bytes.as_mut_ptr().add(start).cast(),
            span,
            libc::MADV_HUGEPAGE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &mut Vec<u8>, _: usize, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small blocks start on a cache line, large ones on a 2 MiB boundary;
    /// both are zeroed, as long as asked, and keep what is written.
    #[test]
    fn blocks_are_aligned_zeroed_and_kept() {
        for (len, align) in [(100, LINE), (HUGE_FROM, HUGE_PAGE), (3 << 20, HUGE_PAGE)] {
            let mut store = Store::zeroed(len);
            assert_eq!(store.bytes().as_ptr() as usize % align, 0, "{len} bytes");
            assert_eq!(store.bytes().len(), len);
            assert!(store.bytes().iter().all(|&b| b == 0));
            store.bytes_mut()[len - 1] = 7;
            assert_eq!(store.bytes()[len - 1], 7);
        }
    }
}
