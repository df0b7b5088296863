//! Portable CPU code compiled for AVX-512 and AVX2 beside the baseline x86-64 build,
//! chosen at run time (as gemm chooses its own kernels): the row kernels of the CPU backend
//! (`flex/rows.rs`) and the int8 activations' quantisation.

/// `pub fn $name` running `$portable` compiled for AVX-512 or AVX2 when the CPU has them
/// (detected at run time), and as built otherwise.
macro_rules! compiled_per_cpu {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) => $portable:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                if has!("avx512f") && has!("fma") {
                    return unsafe { avx512($($arg),*) };
                }
                if has!("avx2") && has!("fma") {
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
