//! How a row-major batched product `lhs [.., M, K] @ rhs [.., K, N]` is handed to a
//! column-major BLAS (cuBLAS's `gemmStridedBatched`) without copying its operands: a pure
//! function of shapes and strides, checked here on the CPU against a column-major
//! reference, so that no GPU is needed to test it.
//!
//! A row-major matrix is the column-major matrix of its transpose, so the BLAS computes
//! `outᵀ [N, M] = rhsᵀ [N, K] · lhsᵀ [K, M]`, with the output dense row-major.

/// A row-major matrix operand as a column-major BLAS reads it: its transpose stored with
/// leading dimension `ld` (`transposed = false`: rows are dense), or itself
/// (`transposed = true`: columns are dense).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    pub transposed: bool,
    pub ld: usize,
    /// Elements between consecutive matrices of the batch (0: one matrix for all).
    pub batch_stride: usize,
}

/// How a tensor of `shape` and `strides` [.., rows, cols] can be read as `batch` matrices
/// (or one, broadcast), or `None` when it cannot without a copy: its batch dimensions do
/// not walk with one stride, or its matrices are not dense in one order (a broadcast row
/// or column, stride 0, is not).
pub fn operand(shape: &[usize], strides: &[usize], batch: usize) -> Option<Operand> {
    let rank = shape.len();
    let (rows, cols) = (shape[rank - 2], shape[rank - 1]);
    let (row_stride, col_stride) = (strides[rank - 2], strides[rank - 1]);
    // A dimension of extent 1 can take any stride; the other must reach past it.
    let (transposed, ld) = if col_stride == 1 || cols == 1 {
        if rows > 1 && row_stride < cols.max(1) {
            return None;
        }
        (false, if rows > 1 { row_stride } else { cols.max(1) })
    } else if row_stride == 1 || rows == 1 {
        if cols > 1 && col_stride < rows.max(1) {
            return None;
        }
        (true, if cols > 1 { col_stride } else { rows.max(1) })
    } else {
        return None;
    };
    let matrices: usize = shape[..rank - 2].iter().product();
    let batch_stride = if matrices == 1 {
        0
    } else {
        // The batch dimensions must flatten to one stride: each the next one's extent apart.
        let dims: Vec<usize> = (0..rank - 2).filter(|&d| shape[d] > 1).collect();
        let innermost = strides[*dims.last()?];
        let mut expected = innermost;
        for &d in dims.iter().rev() {
            if strides[d] != expected {
                return None;
            }
            expected *= shape[d];
        }
        if matrices != batch || innermost == 0 {
            return None;
        }
        innermost
    };
    Some(Operand {
        transposed,
        ld,
        batch_stride,
    })
}

/// The sizes of `lhs [.., M, K] @ rhs [.., K, N]`: batch dimensions broadcast where one
/// side has extent 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// The output's shape: the broadcast batch dimensions, then M, N.
    pub out_shape: Vec<usize>,
    /// Matrices in the output.
    pub batch: usize,
}

/// The product of operands of these shapes, or `None` when they do not multiply.
pub fn product(lhs: &[usize], rhs: &[usize]) -> Option<Product> {
    let rank = lhs.len();
    if rank < 2 || rhs.len() != rank || lhs[rank - 1] != rhs[rank - 2] {
        return None;
    }
    let (m, k, n) = (lhs[rank - 2], lhs[rank - 1], rhs[rank - 1]);
    let mut out_shape = Vec::with_capacity(rank);
    for d in 0..rank - 2 {
        let (a, b) = (lhs[d], rhs[d]);
        if a != b && a != 1 && b != 1 {
            return None;
        }
        out_shape.push(a.max(b));
    }
    let batch = out_shape.iter().product();
    out_shape.extend([m, n]);
    Some(Product {
        m,
        k,
        n,
        out_shape,
        batch,
    })
}

/// One column-major strided-batched GEMM, `C = op(A) · op(B)` for each of `batch`
/// matrices, in the BLAS's own terms (`C` is `m × n` with leading dimension `ldc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
}

impl Gemm {
    /// `lhs @ rhs` into a dense row-major output: `A = rhsᵀ`, `B = lhsᵀ`, `C = outᵀ`.
    pub fn row_major(p: &Product, lhs: Operand, rhs: Operand) -> Self {
        Self {
            m: p.n,
            n: p.m,
            k: p.k,
            a: rhs,
            b: lhs,
            ldc: p.n,
            stride_c: p.m * p.n,
            batch: p.batch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a column-major BLAS computes for `g` on flat buffers (the reference).
    fn column_major_gemm(g: &Gemm, a: &[f32], b: &[f32]) -> Vec<f32> {
        // op(X)[i, j] for a column-major X with leading dimension ld.
        let at = |x: &[f32], o: &Operand, base: usize, i: usize, j: usize| {
            if o.transposed {
                x[base + j + i * o.ld]
            } else {
                x[base + i + j * o.ld]
            }
        };
        let mut c = vec![0f32; g.stride_c * (g.batch - 1) + g.ldc * g.n];
        for t in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    c[t * g.stride_c + i + j * g.ldc] = (0..g.k)
                        .map(|l| {
                            at(a, &g.a, t * g.a.batch_stride, i, l)
                                * at(b, &g.b, t * g.b.batch_stride, l, j)
                        })
                        .sum();
                }
            }
        }
        c
    }

    /// A strided view: element `index` of `shape` at `offset + Σ index·stride` in `buffer`.
    struct View {
        shape: Vec<usize>,
        strides: Vec<usize>,
        buffer: Vec<f32>,
    }

    impl View {
        fn get(&self, index: &[usize]) -> f32 {
            let at: usize = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
            self.buffer[at]
        }
    }

    /// A view of `shape` whose dimensions are laid out in `order` (outermost first), with
    /// `pad` unused elements after each row of the innermost dimension.
    fn view(shape: &[usize], order: &[usize], pad: usize, seed: u32) -> View {
        let mut strides = vec![0; shape.len()];
        let mut step = 1;
        for (k, &d) in order.iter().rev().enumerate() {
            strides[d] = step;
            step *= shape[d] + if k == 0 { pad } else { 0 };
        }
        let len = step.max(1);
        let buffer = (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        View {
            shape: shape.to_vec(),
            strides,
            buffer,
        }
    }

    /// Plans `lhs @ rhs`, runs the plan on the reference, and compares with the product
    /// computed element by element from the views.
    fn check(lhs: &View, rhs: &View) {
        let p = product(&lhs.shape, &rhs.shape).expect("shapes multiply");
        let a = operand(&lhs.shape, &lhs.strides, p.batch).expect("lhs without copy");
        let b = operand(&rhs.shape, &rhs.strides, p.batch).expect("rhs without copy");
        let g = Gemm::row_major(&p, a, b);
        let out = column_major_gemm(&g, &rhs.buffer, &lhs.buffer);
        let batch_dims = &p.out_shape[..p.out_shape.len() - 2];
        let rank = lhs.shape.len();
        for t in 0..p.batch {
            // The batch index, broadcast where an operand has extent 1.
            let mut rest = t;
            let mut index = vec![0; rank - 2];
            for d in (0..rank - 2).rev() {
                index[d] = rest % batch_dims[d];
                rest /= batch_dims[d];
            }
            let pick = |v: &View, i: usize, j: usize| {
                let mut at: Vec<usize> = (0..rank - 2)
                    .map(|d| if v.shape[d] == 1 { 0 } else { index[d] })
                    .collect();
                at.extend([i, j]);
                v.get(&at)
            };
            for i in 0..p.m {
                for j in 0..p.n {
                    let want: f32 = (0..p.k).map(|l| pick(lhs, i, l) * pick(rhs, l, j)).sum();
                    let got = out[t * p.m * p.n + i * p.n + j];
                    assert!(
                        (want - got).abs() < 1e-3,
                        "batch {t} [{i}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn dense_transposed_padded_and_broadcast_operands_multiply_without_copies() {
        // Dense row-major.
        check(&view(&[3, 4], &[0, 1], 0, 1), &view(&[4, 5], &[0, 1], 0, 2));
        // Transposed views (columns dense), and padded leading dimensions (a slice of a
        // wider tensor, as q, k and v of a fused projection are).
        check(&view(&[3, 4], &[1, 0], 0, 3), &view(&[4, 5], &[1, 0], 2, 4));
        check(
            &view(&[1, 3, 4], &[0, 1, 2], 3, 12),
            &view(&[2, 4, 5], &[0, 1, 2], 1, 13),
        );
        // A batch, one side broadcast (one matrix for all), and k = 1.
        check(
            &view(&[2, 3, 3, 4], &[0, 1, 2, 3], 0, 5),
            &view(&[1, 1, 4, 2], &[0, 1, 2, 3], 0, 6),
        );
        check(
            &view(&[6, 3, 1], &[0, 1, 2], 0, 7),
            &view(&[6, 1, 5], &[0, 2, 1], 0, 8),
        );
        // Attention's kᵀ: [B, H, L, d] read as [B, H, d, L] (a swap of the last two).
        let k = view(&[2, 2, 5, 4], &[0, 1, 2, 3], 0, 9);
        let kt = View {
            shape: vec![2, 2, 4, 5],
            strides: vec![k.strides[0], k.strides[1], k.strides[3], k.strides[2]],
            buffer: k.buffer.clone(),
        };
        check(&view(&[2, 2, 3, 4], &[0, 1, 2, 3], 0, 10), &kt);
        // Heads interleaved in the batch ([B, N, H, d] seen as [B, H, N, d]): the batch
        // dimensions do not flatten to one stride.
        let q = view(&[2, 3, 2, 4], &[0, 2, 1, 3], 0, 11);
        assert_eq!(operand(&q.shape, &q.strides, 6), None);
    }

    #[test]
    fn what_cannot_be_read_without_a_copy_is_refused() {
        // Neither dimension dense.
        assert_eq!(operand(&[3, 4], &[8, 2], 1), None);
        // A broadcast row (stride 0): the leading dimension would overlap rows.
        assert_eq!(operand(&[3, 4], &[0, 1], 1), None);
        assert_eq!(operand(&[3, 4], &[1, 0], 1), None);
        // A broadcast batch dimension of extent > 1.
        assert_eq!(operand(&[2, 3, 4], &[0, 4, 1], 2), None);
        // A batch that is not the output's.
        assert_eq!(operand(&[2, 3, 4], &[12, 4, 1], 6), None);
        assert_eq!(product(&[2, 3, 4], &[3, 4, 5]), None);
        assert_eq!(product(&[3, 4], &[5, 6]), None);
    }
}
