//! The host-side arithmetic of launching work on microdit's own CUDA stream, as pure
//! functions tested on the CPU (no GPU is needed to check them): the handshake's sequence
//! numbers and their comparison (`stream_order`), which compiled image of an ahead-of-time Triton kernel a GPU
//! loads, and how a launch's arguments fill the kernel's parameter list.

/// The number after `sequence`, wrapping around and skipping 0 (the flags' initial value).
pub fn next_sequence(sequence: u32) -> u32 {
    sequence.wrapping_add(1).max(1)
}

/// A kernel parameter's type, as the PTX `.param` list declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Pointer,
    I32,
    F32,
}

/// One Triton kernel compiled ahead of time (the table `triton_kernels::KERNELS`, which
/// `kernels/build.py` generates).
#[derive(Debug)]
pub struct TritonKernel {
    /// The variant's name (kernel, dtype, head size …), as `kernels/*.py` `BUILDS` give it.
    pub name: &'static str,
    /// The entry symbol in the images.
    pub function: &'static str,
    /// Every `.param` in order, Triton's trailing scratch pointers included.
    pub params: &'static [(&'static str, ParamType)],
    /// The compile-time constants the variant was built with.
    pub constexprs: &'static [(&'static str, i64)],
    pub num_warps: u32,
    /// Dynamic shared memory per launch, in bytes, for `[sm_80, sm_90]`.
    pub shared: [u32; 2],
    pub cubin_sm80: &'static [u8],
    pub cubin_sm90: &'static [u8],
    /// PTX of the sm_80 build (no `sm_90a`-only instructions), which newer GPUs compile.
    pub ptx: &'static [u8],
}

/// Which image of a kernel a GPU of compute capability `major.minor` loads, and the
/// shared memory its launches take; `None` below sm_80 (the caller keeps burn's path).
pub fn image(kernel: &TritonKernel, major: i32, minor: i32) -> Option<(&'static [u8], u32)> {
    match (major, minor) {
        // sm_90a cubins use Hopper-only instructions (wgmma): exactly 9.0.
        (9, 0) => Some((kernel.cubin_sm90, kernel.shared[1])),
        // A cubin runs on later minors of its major version.
        (8, _) => Some((kernel.cubin_sm80, kernel.shared[0])),
        (m, _) if m >= 9 => Some((kernel.ptx, kernel.shared[0])),
        _ => None,
    }
}

/// A launch argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Pointer(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    fn fits(&self, param: ParamType) -> bool {
        matches!(
            (self, param),
            (Arg::Pointer(_), ParamType::Pointer)
                | (Arg::I32(_), ParamType::I32)
                | (Arg::F32(_), ParamType::F32)
        )
    }
}

/// Triton appends two scratch pointers (global and profile scratch) to every kernel's
/// parameters; microdit's kernels use no scratch memory, so they get null.
const HIDDEN_SCRATCH: usize = 2;

/// The value of every `.param` of `kernel`: `args` for the declared parameters, in order,
/// then null for Triton's scratch pointers. Errs when the count or a type differs.
pub fn pack(kernel: &TritonKernel, args: &[Arg]) -> Result<Vec<Arg>, String> {
    let declared = kernel.params.len().saturating_sub(HIDDEN_SCRATCH);
    if args.len() != declared {
        return Err(format!(
            "{}: {} arguments for {declared} parameters",
            kernel.name,
            args.len()
        ));
    }
    let hidden = [Arg::Pointer(0); HIDDEN_SCRATCH];
    let values: Vec<Arg> = args.iter().chain(&hidden).copied().collect();
    for (value, (name, param)) in values.iter().zip(kernel.params) {
        if !value.fits(*param) {
            return Err(format!(
                "{}: parameter {name} is {param:?}, given {value:?}",
                kernel.name
            ));
        }
    }
    Ok(values)
}

/// The value of compile-time constant `name` of `kernel`.
pub fn constexpr(kernel: &TritonKernel, name: &str) -> Option<i64> {
    kernel
        .constexprs
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
}

/// `sum_partials` of kernels/chains.py: f32 partial sums `[groups, parts, cols]` (one row
/// per program of a backward) added over `parts` in a fixed order into `[groups, cols]`,
/// one program per (group, block of columns): reductions without atomics, the same bits
/// every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialSums {
    pub groups: usize,
    pub parts: usize,
    pub cols: usize,
}

impl PartialSums {
    /// The buffer's dimensions.
    pub fn dims(&self) -> [usize; 3] {
        [self.groups, self.parts, self.cols]
    }

    /// `sum_partials(part, out, parts, cols)`.
    pub fn args(&self, [part, out]: [u64; 2]) -> Vec<Arg> {
        let sizes = [self.parts, self.cols].map(|n| Arg::I32(n as i32));
        [Arg::Pointer(part), Arg::Pointer(out)]
            .into_iter()
            .chain(sizes)
            .collect()
    }

    pub fn grid(&self, sum: &TritonKernel) -> (u32, u32, u32) {
        let cols = constexpr(sum, "COLS").expect("the kernel's columns") as usize;
        (self.groups as u32, blocks(self.cols, cols), 1)
    }

    /// The same sums over `groups` of the groups only (a buffer holding several vectors'
    /// partials, one after another).
    pub fn split(&self, groups: usize) -> Self {
        Self { groups, ..*self }
    }
}

/// The compiled kernel `name` (the launch plans' tests check their calls against it).
#[cfg(test)]
pub fn compiled(name: &str) -> &'static TritonKernel {
    crate::backend::triton_kernels::KERNELS
        .iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("no compiled kernel {name}"))
}

/// `ceil(n / block)`.
pub fn blocks(n: usize, block: usize) -> u32 {
    n.div_ceil(block.max(1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: &[(&str, ParamType)] = &[
        ("x", ParamType::Pointer),
        ("scale", ParamType::F32),
        ("n", ParamType::I32),
        ("global_scratch", ParamType::Pointer),
        ("profile_scratch", ParamType::Pointer),
    ];

    fn kernel() -> TritonKernel {
        TritonKernel {
            name: "test",
            function: "test",
            params: PARAMS,
            constexprs: &[("BLOCK", 64)],
            num_warps: 4,
            shared: [100, 200],
            cubin_sm80: b"80",
            cubin_sm90: b"90",
            ptx: b"ptx",
        }
    }

    /// Whether a handshake flag holding `flag` has reached `value`, across the wrap of the
    /// sequence: `flag − value` (mod 2³²) in the lower half. The CPU reference of what both
    /// handshake kernels in `stream_order` compute: a wait for a number that a later one
    /// has overtaken (work that panicked before signalling) still ends.
    fn reached(flag: u32, value: u32) -> bool {
        flag.wrapping_sub(value) < 1 << 31
    }

    #[test]
    fn the_sequence_wraps_past_zero() {
        assert_eq!(next_sequence(0), 1);
        assert_eq!(next_sequence(41), 42);
        assert_eq!(next_sequence(u32::MAX), 1, "0 is the flags' initial value");
        assert!(reached(42, 42) && reached(43, 42) && !reached(41, 42));
        assert!(reached(1, u32::MAX), "past the wrap");
        assert!(!reached(u32::MAX, 1), "before the wrap");
        assert!(!reached(0, 1), "the initial value reaches nothing");
    }

    /// The parameter types of `function`'s `.entry` in `ptx`, and its `.reqntid` (threads
    /// per block the kernel was compiled for).
    fn ptx_entry(ptx: &str, function: &str) -> (Vec<ParamType>, Option<u32>) {
        let start = ptx
            .find(&format!(".entry {function}("))
            .unwrap_or_else(|| panic!("no .entry {function} in the PTX"));
        let entry = &ptx[start..];
        let list = &entry[..entry.find(')').expect("end of the parameter list")];
        let params = list
            .lines()
            .filter_map(|line| line.trim().strip_prefix(".param "))
            .map(
                |decl| match decl.split_whitespace().collect::<Vec<_>>()[..] {
                    [".u64", ".ptr", ..] => ParamType::Pointer,
                    [".u32" | ".s32" | ".b32", _] => ParamType::I32,
                    [".f32", _] => ParamType::F32,
                    _ => panic!("{function}: unknown parameter {decl}"),
                },
            )
            .collect();
        let threads = entry.split_once(".reqntid").and_then(|(_, rest)| {
            rest.split_whitespace()
                .next()?
                .trim_end_matches(',')
                .parse()
                .ok()
        });
        (params, threads)
    }

    /// Every compiled kernel's table entry agrees with its own PTX: the parameters a launch
    /// packs, in order and type, and the threads per block a launch gives.
    #[test]
    fn the_kernel_table_matches_each_kernels_ptx() {
        let kernels = crate::backend::triton_kernels::KERNELS;
        assert!(!kernels.is_empty());
        for kernel in kernels {
            let ptx = std::str::from_utf8(kernel.ptx).expect("PTX text");
            let (params, threads) = ptx_entry(ptx, kernel.function);
            let table: Vec<ParamType> = kernel.params.iter().map(|(_, t)| *t).collect();
            assert_eq!(table, params, "{}", kernel.name);
            assert_eq!(threads, Some(kernel.num_warps * 32), "{}", kernel.name);
            let hidden = &kernel.params[kernel.params.len() - HIDDEN_SCRATCH..];
            assert!(
                hidden.iter().all(|(_, t)| *t == ParamType::Pointer),
                "{}: Triton's scratch pointers last",
                kernel.name
            );
            // The opt-in shared memory per block of sm_80 and sm_90.
            assert!(kernel.shared[0] <= 163 * 1024 && kernel.shared[1] <= 227 * 1024);
            for image in [kernel.cubin_sm80, kernel.cubin_sm90] {
                assert_eq!(
                    &image[..4],
                    b"\x7fELF",
                    "{}: a cubin is an ELF image",
                    kernel.name
                );
            }
        }
    }

    #[test]
    fn each_gpu_generation_loads_an_image_it_can_run() {
        let k = kernel();
        assert_eq!(image(&k, 9, 0), Some((&b"90"[..], 200)));
        assert_eq!(image(&k, 8, 0), Some((&b"80"[..], 100)));
        assert_eq!(image(&k, 8, 9), Some((&b"80"[..], 100)));
        assert_eq!(image(&k, 10, 0), Some((&b"ptx"[..], 100)));
        assert_eq!(image(&k, 7, 5), None);
    }

    #[test]
    fn arguments_fill_the_declared_parameters_then_null_scratch() {
        let k = kernel();
        let args = [Arg::Pointer(7), Arg::F32(0.5), Arg::I32(3)];
        let packed = pack(&k, &args).unwrap();
        assert_eq!(packed.len(), PARAMS.len());
        assert_eq!(&packed[..3], &args);
        assert_eq!(&packed[3..], &[Arg::Pointer(0); 2]);
        let e = pack(&k, &args[..2]).unwrap_err();
        assert!(e.contains("2 arguments for 3 parameters"), "{e}");
        let e = pack(&k, &[Arg::Pointer(7), Arg::I32(1), Arg::I32(3)]).unwrap_err();
        assert!(e.contains("parameter scale is F32"), "{e}");
        assert_eq!(constexpr(&k, "BLOCK"), Some(64));
        assert_eq!(blocks(77, 64), 2);
        assert_eq!(blocks(128, 64), 2);
    }
}
