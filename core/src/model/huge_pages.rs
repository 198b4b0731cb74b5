//! A CPU model's weights in one buffer backed by 2 MB pages where the kernel offers them
//! (transparent huge pages in `madvise` or `always` mode, the default of most Linux
//! distributions). Decoding reads every weight once a token: with 4 KB pages that is a
//! TLB miss and a restart of the hardware prefetcher's stream every 4 KB. On a Zen 3 the
//! SmolLM2-135M shape's forward passes of 1, 9 and 25 tokens took 1-6% less so (first
//! quartiles and medians; its layer products on explicit huge pages 5-6% less, fastest
//! rounds; docs/BENCHMARKS.md). libtorch's allocator only asks for huge pages when
//! `THP_MEM_ALLOC_ENABLE` is set, and then only for the 2 MB ranges that happen to fall
//! inside each tensor (295 of that model's 540 MB).

// The `madvise` and `malloc_trim` calls: what each relies on is stated where it is used.
#![allow(unsafe_code)]

use std::sync::RwLock;

use tch::{Device, Kind, Tensor};

/// Bytes of a huge page (x86-64 and most arm64 kernels).
const HUGE_PAGE: usize = 2 << 20;

/// Where each tensor starts: a multiple of 64 bytes (a cache line, and the alignment
/// libtorch gives its own buffers).
const ALIGN: usize = 64;

/// The spans of the buffers [`pack`] filled with more bytes than the last-level cache holds:
/// weights each decoding step reads from memory, not from a cache.
static FROM_MEMORY: RwLock<Vec<std::ops::Range<usize>>> = RwLock::new(Vec::new());

/// Whether `address` lies in a buffer of weights too big for the last-level cache (a hint
/// for the few-row kernel's prefetching; a buffer freed since counts until another packed
/// buffer takes its place, which costs nothing but the hint).
pub fn read_from_memory(address: usize) -> bool {
    FROM_MEMORY.read().is_ok_and(|spans| spans.iter().any(|s| s.contains(&address)))
}

/// Bytes of a core's last-level cache (`/sys`; 32 MB where it does not say).
pub(super) fn last_level_cache() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").unwrap_or_default();
        let text = text.trim();
        let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
        let scale = match unit {
            "K" => 1 << 10,
            "M" => 1 << 20,
            "" => 1,
            _ => 0,
        };
        digits.parse::<usize>().ok().map(|d| d * scale).filter(|&b| b > 0).unwrap_or(32 << 20)
    })
}

/// Whether [`pack`] runs: unless `MTP_HUGE_PAGES=0` (to compare, or to keep each weight in
/// a buffer of its own).
pub fn enabled() -> bool {
    std::env::var("MTP_HUGE_PAGES").map_or(true, |v| v != "0")
}

/// Move `tensors` (CPU, contiguous, no gradient; several of one kind) into one buffer per
/// kind whose 2 MB-aligned span the kernel is asked to back with huge pages, each tensor
/// becoming a view of it with the same values. Tensors that do not qualify are left as
/// they are. Returns the bytes moved.
pub fn pack(tensors: Vec<&mut Tensor>) -> usize {
    let mut moved = 0;
    let mut rest: Vec<&mut Tensor> = tensors
        .into_iter()
        .filter(|t| t.defined() && t.device() == Device::Cpu && !t.requires_grad() && t.numel() > 0)
        .collect();
    while let Some(kind) = rest.first().map(|t| t.kind()) {
        let (same, other): (Vec<&mut Tensor>, Vec<&mut Tensor>) = rest.into_iter().partition(|t| t.kind() == kind);
        moved += pack_kind(same, kind);
        rest = other;
    }
    moved
}

/// [`pack`] for tensors of one kind.
fn pack_kind(tensors: Vec<&mut Tensor>, kind: Kind) -> usize {
    let size = kind.elt_size_in_bytes();
    let align = ALIGN / size;
    let offsets: Vec<usize> = tensors
        .iter()
        .scan(0usize, |end, t| {
            let at = end.div_ceil(align) * align;
            *end = at + t.numel();
            Some(at)
        })
        .collect();
    let total = offsets.last().zip(tensors.last()).map_or(0, |(at, t)| at + t.numel());
    // Room to start the first tensor on a huge page wherever the allocation begins.
    let slack = HUGE_PAGE / size;
    let buffer = Tensor::empty([(total + slack) as i64], (kind, Device::Cpu));
    let address = buffer.data_ptr() as usize;
    let first = (address.div_ceil(HUGE_PAGE) * HUGE_PAGE - address) / size;
    let bytes = total * size;
    advise_huge_pages(address + first * size, bytes);
    if let Ok(mut spans) = FROM_MEMORY.write() {
        // A span overlapping this buffer belonged to one freed since (a model loaded before).
        let span = address..address + (total + slack) * size;
        spans.retain(|s| s.end <= span.start || span.end <= s.start);
        if bytes > last_level_cache() {
            spans.push(span);
        }
    }
    let moved = tensors.iter().map(|t| t.numel() * size).sum();
    tch::no_grad(|| {
        for (t, at) in tensors.into_iter().zip(offsets) {
            let mut view = buffer.narrow(0, (first + at) as i64, t.numel() as i64).view(t.size().as_slice());
            view.copy_(t);
            *t = view;
            // The old buffer, freed here, goes back to the system now rather than staying in
            // the process's heap: resident memory stays about one copy of the weights.
            release_free_memory();
        }
    });
    moved
}

/// Ask the kernel to back the pages of `bytes` bytes from `start` (2 MB-aligned, within a
/// live allocation not yet written) with huge pages: advice only, refused (EINVAL) by a
/// kernel without transparent huge pages, which changes nothing.
fn advise_huge_pages(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        // Whole 4 KB pages only, all within the allocation.
        let length = bytes / 4096 * 4096;
        // SAFETY: the range lies within the caller's allocation (see above), which outlives
        // the call; madvise records advice for its pages and changes no value.
        let advised = unsafe { libc::madvise(start as *mut libc::c_void, length, libc::MADV_HUGEPAGE) };
        if advised != 0 {
            tracing::debug!("huge pages refused for {bytes} bytes of weights: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// Return the heap's free pages to the system (glibc keeps freed memory below 32 MB a
/// block for reuse).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases pages no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_keep_their_values_in_one_buffer() {
        let o = (Kind::Float, Device::Cpu);
        let originals = [Tensor::randn([300, 7], o), Tensor::randn([5], o), Tensor::randn([64, 64], o)];
        let mut copies: Vec<Tensor> = originals.iter().map(|t| t.copy()).collect();
        let mut halves = [Tensor::randn([9, 3], (Kind::BFloat16, Device::Cpu))];
        let half_values = halves[0].copy();
        let moved = pack(copies.iter_mut().chain(halves.iter_mut()).collect());
        assert_eq!(moved, (300 * 7 + 5 + 64 * 64) * 4 + 27 * 2);
        for (a, b) in originals.iter().zip(&copies) {
            assert!(a.equal(b));
            assert!(b.is_contiguous());
            assert_eq!(b.data_ptr() as usize % ALIGN, 0);
        }
        assert!(halves[0].equal(&half_values));
        // One buffer for the f32 tensors, in order; the first on a huge page.
        let at = |t: &Tensor| t.data_ptr() as usize;
        assert_eq!(at(&copies[0]) % HUGE_PAGE, 0);
        assert_eq!(at(&copies[1]), at(&copies[0]) + (300 * 7 * 4usize).div_ceil(ALIGN) * ALIGN);
        assert!(at(&copies[2]) > at(&copies[1]));
    }

    #[test]
    fn only_buffers_bigger_than_the_cache_read_from_memory() {
        let o = (Kind::Float, Device::Cpu);
        let mut small = Tensor::randn([64, 64], o);
        pack(vec![&mut small]);
        assert!(!read_from_memory(small.data_ptr() as usize));
        let values = last_level_cache() / 4 + 1024;
        let mut big = Tensor::zeros([values as i64], o);
        pack(vec![&mut big]);
        assert!(read_from_memory(big.data_ptr() as usize));
        assert!(read_from_memory(big.data_ptr() as usize + values * 4 - 4));
        assert!(!read_from_memory(small.data_ptr() as usize));
    }

    #[test]
    fn trainable_tensors_stay_where_they_are() {
        let mut leaf = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let before = leaf.data_ptr();
        assert_eq!(pack(vec![&mut leaf]), 0);
        assert_eq!(leaf.data_ptr(), before);
        assert!(leaf.requires_grad());
    }
}
