//! The process's memory: glibc's malloc settings, giving freed memory back once a large
//! part of a pipeline is let go, and the peak resident memory that `generate` reports.

/// glibc's malloc hands buffers above a moving threshold back to the kernel when they are
/// freed, so every tensor of that size is mapped afresh and its pages faulted in and zeroed
/// (13% of a CPU training step). Serving up to 32 MiB (the largest threshold glibc allows)
/// from the heap and never trimming it lets freed tensors be reused: 9% off a training step,
/// the same peak memory.
pub fn keep_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Gives the heap's free pages back to the system now. [`keep_freed`] keeps them for reuse,
/// which is right between training steps but not after a large part (the text tower, the
/// denoiser) is dropped for good: its buffers would stay resident beside whatever comes
/// next in larger ones.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The most memory this process has held resident so far, in bytes; `None` where the
/// system does not say. On Linux, the `VmHWM` of `/proc/self/status`: `getrusage`'s maximum
/// carries over through `exec` the memory of the process that started this one.
#[cfg(target_os = "linux")]
pub fn peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The most memory this process has held resident so far, in bytes (`getrusage`'s maximum
/// resident set; macOS counts it in bytes).
#[cfg(all(unix, not(target_os = "linux")))]
pub fn peak() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given and touches nothing else.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    // SAFETY: zeroed is a valid rusage, and getrusage filled it on success.
    let max_rss = unsafe { usage.assume_init() }.ru_maxrss;
    let unit = if cfg!(target_os = "macos") { 1 } else { 1024 };
    (ok && max_rss > 0).then(|| max_rss as u64 * unit)
}

#[cfg(not(unix))]
pub fn peak() -> Option<u64> {
    None
}
