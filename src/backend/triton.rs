//! Triton kernels compiled ahead of time (`kernels/*.py`, built by `kernels/build.py` into
//! the cubins and PTX that `triton_kernels.rs` embeds), loaded by the CUDA driver and
//! launched on microdit's own stream, which `stream_order` orders against cubecl's. No
//! compiler runs at run time. `MICRODIT_TRITON=off` keeps burn's operations instead.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result as driver, sys as driver_sys};

use super::launch_plan::{image, pack, Arg, TritonKernel};
use super::stream_order::OwnStream;
use super::triton_kernels::KERNELS;

/// Whether microdit's Triton kernels run (not with `MICRODIT_TRITON=off`).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("MICRODIT_TRITON").as_deref() != Ok("off"))
}

/// The compiled variant called `name`.
pub fn kernel(name: &str) -> Option<&'static TritonKernel> {
    KERNELS.iter().find(|k| k.name == name)
}

/// A kernel loaded on one GPU, and the dynamic shared memory its launches take.
#[derive(Clone, Copy)]
struct Loaded {
    function: driver_sys::CUfunction,
    shared: u32,
}

// SAFETY: a loaded function is a handle valid in every thread of the process.
unsafe impl Send for Loaded {}

/// `kernel` loaded on GPU `device` (once; its module is never unloaded), or `None` where the
/// GPU cannot run it. Ask before [`launch`], outside `stream_order::run`.
pub fn available(device: usize, kernel: &'static TritonKernel) -> bool {
    load(device, kernel).is_some()
}

/// Loads every compiled kernel on GPU `device` and names those it cannot run (no image for
/// its compute capability, or the driver refused one): the GPU check's first question.
pub fn unloadable_kernels(device: usize) -> Vec<&'static str> {
    KERNELS
        .iter()
        .filter(|kernel| !available(device, kernel))
        .map(|kernel| kernel.name)
        .collect()
}

/// Each kernel on each GPU, once loaded (or found unloadable).
type LoadedKernels = HashMap<(usize, &'static str), Option<Loaded>>;

fn load(device: usize, kernel: &'static TritonKernel) -> Option<Loaded> {
    static LOADED: OnceLock<Mutex<LoadedKernels>> = OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *loaded.entry((device, kernel.name)).or_insert_with(|| {
        let result = load_module(device, kernel);
        if let Err(e) = &result {
            eprintln!(
                "microdit: kernel {} did not load ({e}); burn's operations run instead",
                kernel.name
            );
        }
        result.ok().flatten()
    })
}

fn load_module(device: usize, kernel: &TritonKernel) -> anyhow::Result<Option<Loaded>> {
    super::cuda_runtime::primary_context(device)?;
    // SAFETY: driver calls with the device's context current; the image outlives the call.
    unsafe { load_image(device, kernel) }.map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// # Safety
/// The device's context is current.
unsafe fn load_image(
    device: usize,
    kernel: &TritonKernel,
) -> Result<Option<Loaded>, driver::DriverError> {
    use driver_sys::CUdevice_attribute::*;
    let handle = driver::device::get(device as i32)?;
    let major =
        driver::device::get_attribute(handle, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor =
        driver::device::get_attribute(handle, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let Some((bytes, shared)) = image(kernel, major, minor) else {
        return Ok(None);
    };
    // The driver reads PTX as a NUL-terminated string; a cubin carries its own length.
    let mut owned = bytes.to_vec();
    owned.push(0);
    let module = driver::module::load_data(owned.as_ptr() as *const c_void)?;
    let name = CString::new(kernel.function).expect("kernel name");
    let function = driver::module::get_function(module, name)?;
    if shared > 48 * 1024 {
        driver::function::set_function_attribute(
            function,
            driver_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )?;
    }
    Ok(Some(Loaded { function, shared }))
}

/// Enqueues `kernel` on the own stream of GPU `device` over `grid` blocks.
///
/// # Safety
/// Runs inside `stream_order::run` for `device`, after [`available`] said yes; every
/// pointer in `args` is a live allocation of the sizes the kernel reads and writes.
pub unsafe fn launch(
    own: &OwnStream,
    device: usize,
    kernel: &'static TritonKernel,
    grid: (u32, u32, u32),
    args: &[Arg],
) {
    let loaded = load(device, kernel).expect("a kernel checked as available");
    let mut values = pack(kernel, args).unwrap_or_else(|e| panic!("launch of {e}"));
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|value| match value {
            Arg::Pointer(p) => p as *mut u64 as *mut c_void,
            Arg::I32(i) => i as *mut i32 as *mut c_void,
            Arg::F32(f) => f as *mut f32 as *mut c_void,
        })
        .collect();
    let block = (kernel.num_warps * 32, 1, 1);
    driver::launch_kernel(
        loaded.function,
        grid,
        block,
        loaded.shared,
        own.stream,
        &mut params,
    )
    .unwrap_or_else(|e| panic!("launch of {}: {e:?}", kernel.name));
}
