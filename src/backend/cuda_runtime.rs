//! cubecl's run-time settings for the CUDA backend: where compiled kernels (PTX) and
//! autotune results are kept between runs.
//!
//! Without a cache every process compiles its kernels again through NVRTC (most of a cold
//! start). microdit keeps both caches in `$MICRODIT_CACHE/cubecl`, or the user cache
//! directory (`~/.cache/microdit/cubecl` on Linux). A `cubecl.toml` (or `[cubecl]` in a
//! `burn.toml`) in the working directory or above that names a compilation cache is obeyed
//! instead; `CUBECL_AUTOTUNE_LEVEL` and `CUBECL_DEBUG_LOG` keep working.
//!
//! Also the one place that opens a stream of microdit's own (for cuBLAS and NCCL) on the
//! context cubecl runs on.

use std::path::PathBuf;
use std::sync::Once;

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use cudarc::driver::{result as driver, sys as driver_sys};

/// The cache directory: `$MICRODIT_CACHE/cubecl` or `<user cache>/microdit/cubecl`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MICRODIT_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("microdit")))
        .unwrap_or_else(|| PathBuf::from(".microdit-cache"))
        .join("cubecl")
}

/// Sets cubecl's configuration once, before the first CUDA device is used.
pub fn configure() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            let dir = cache_dir();
            let cold = std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none());
            if cold {
                eprintln!(
                    "microdit: first use of this GPU setup: compiling CUDA kernels as they are needed \
                     (about a minute); they are kept in {} for later runs",
                    dir.display()
                );
            }
            config.compilation.cache = Some(CacheConfig::File(dir.clone()));
            config.autotune.cache = CacheConfig::File(dir);
        }
        CubeClRuntimeConfig::set(config);
    });
}

/// GPU `device`'s primary context (the one cubecl uses), made current.
pub fn primary_context(device: usize) -> anyhow::Result<driver_sys::CUcontext> {
    use anyhow::Context;
    // SAFETY: plain driver calls; the primary context stays retained for the process.
    unsafe {
        let handle = driver::device::get(device as i32).context("CUDA device")?;
        let context = driver::primary_ctx::retain(handle).context("CUDA primary context")?;
        driver::ctx::set_current(context).context("CUDA context")?;
        Ok(context)
    }
}

/// GPU `device`'s primary context, made current, and a new non-blocking stream on it.
pub fn own_stream(device: usize) -> anyhow::Result<(driver_sys::CUcontext, driver_sys::CUstream)> {
    use anyhow::Context;
    let context = primary_context(device)?;
    let stream =
        driver::stream::create(driver::stream::StreamKind::NonBlocking).context("CUDA stream")?;
    Ok((context, stream))
}
