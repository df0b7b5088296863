//! microdit's operations under autodiff, each one node with its own backward: the matrix
//! product (so the gradients' products are as precise as the forward's), attention
//! (the inner backend's forward and backward; the probabilities are recomputed, not kept,
//! from what the forward saved where it saves anything: FlashAttention's row statistics),
//! the layer norm without a shift (its row statistics recomputed in the backward), exact
//! GELU (burn's backward is the tanh approximation's) and the element-wise chains fused on
//! the CPU: SwiGLU's gated product, AdaLN's
//! modulation and gated residual (one pass each way instead of several operations and
//! their backwards), which share one node type ([`Chain`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{broadcast_shape, Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorMetadata};

use super::{AttentionSaved, MicroditBackend};

impl<B: MicroditBackend, C: CheckpointStrategy> MicroditBackend for Autodiff<B, C> {
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Matmul;

        impl<B: MicroditBackend> Backward<B, 2> for Matmul {
            /// The checkpointed operands (each only when the other one needs a gradient)
            /// and both operands' shapes.
            type State = (Option<NodeId>, Option<NodeId>, Shape, Shape);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [lhs_node, rhs_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (lhs_state, rhs_state, lhs_shape, rhs_shape) = ops.state;
                let lhs: Option<FloatTensor<B>> =
                    lhs_state.map(|id| checkpointer.retrieve_node_output(id));
                let rhs: Option<FloatTensor<B>> =
                    rhs_state.map(|id| checkpointer.retrieve_node_output(id));
                // d lhs = grad · rhsᵀ (needs rhs), d rhs = lhsᵀ · grad (needs lhs); broadcast
                // leading dimensions are summed back to the operand's shape.
                if let (Some(node), Some(rhs)) = (lhs_node, rhs) {
                    let g = B::matmul(grad.clone(), B::float_transpose(rhs));
                    grads.register::<B>(node.id, broadcast_shape::<B>(g, &lhs_shape));
                }
                if let (Some(node), Some(lhs)) = (rhs_node, lhs) {
                    let g = B::matmul(B::float_transpose(lhs), grad);
                    grads.register::<B>(node.id, broadcast_shape::<B>(g, &rhs_shape));
                }
            }
        }

        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        let (lhs_shape, rhs_shape) = (lhs.primitive.shape(), rhs.primitive.shape());
        match Matmul
            .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                // Each operand's gradient needs the other operand.
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                prep.finish(
                    (lhs_state, rhs_state, lhs_shape, rhs_shape),
                    B::matmul(lhs.primitive, rhs.primitive),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul(lhs.primitive, rhs.primitive)),
        }
    }

    fn top_k_indices(values: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        B::top_k_indices(values.primitive, k)
    }

    fn scaled_dot_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attention;

        impl<B: MicroditBackend> Backward<B, 3> for Attention {
            /// The checkpointed q, k, v, whether the attention is causal, and what the
            /// inner backend's forward saved for its backward.
            type State = ([NodeId; 3], bool, Option<AttentionSaved<B>>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (ids, causal, saved) = ops.state;
                let [q, k, v] = ids.map(|id| checkpointer.retrieve_node_output(id));
                let inputs = B::scaled_dot_attention_backward(q, k, v, grad, causal, saved);
                register::<B, _>(ops.parents.map(|p| p.map(|node| node.id)), inputs, grads);
            }
        }

        match Attention
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&q, &k, &v].map(|t| prep.checkpoint(t));
                let (out, saved) =
                    B::scaled_dot_attention_saving(q.primitive, k.primitive, v.primitive, causal);
                prep.finish((ids, causal, saved), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::scaled_dot_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                causal,
            )),
        }
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Gelu;

        impl<B: MicroditBackend> Backward<B, 1> for Gelu {
            /// The checkpointed input.
            type State = NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let x = checkpointer.retrieve_node_output(ops.state);
                let dx = B::gelu_exact_backward(x, grad);
                register::<B, 1>(ops.parents.map(|p| p.map(|node| node.id)), [dx], grads);
            }
        }

        match Gelu
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&x);
                prep.finish(id, B::gelu_exact(x.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_exact(x.primitive)),
        }
    }

    fn scaled_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNorm;

        impl<B: MicroditBackend> Backward<B, 2> for LayerNorm {
            /// The checkpointed x and γ, and ε (the row statistics are recomputed).
            type State = ([NodeId; 2], f64);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (ids, epsilon) = ops.state;
                let [x, gamma] = ids.map(|id| checkpointer.retrieve_node_output(id));
                let inputs = B::scaled_layer_norm_backward(x, gamma, grad, epsilon);
                register::<B, _>(ops.parents.map(|p| p.map(|node| node.id)), inputs, grads);
            }
        }

        match LayerNorm
            .prepare::<C>([x.node.clone(), gamma.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&x, &gamma].map(|t| prep.checkpoint(t));
                let out = B::scaled_layer_norm(x.primitive, gamma.primitive, epsilon);
                prep.finish((ids, epsilon), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::scaled_layer_norm(x.primitive, gamma.primitive, epsilon))
            }
        }
    }

    fn swiglu(gate: FloatTensor<Self>, value: FloatTensor<Self>) -> FloatTensor<Self> {
        fused_chain::<B, C, 2>(
            [gate, value],
            [0, 1],
            |[gate, value]| B::swiglu(gate, value),
            B::swiglu_backward,
        )
    }

    fn modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        fused_chain::<B, C, 3>(
            [x, shift, scale],
            [0, 2],
            |[x, shift, scale]| B::modulate(x, shift, scale),
            B::modulate_backward,
        )
    }

    fn gated_residual(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        fused_chain::<B, C, 3>(
            [x, gate, branch],
            [1, 2],
            |[x, gate, branch]| B::gated_residual(x, gate, branch),
            B::gated_residual_backward,
        )
    }
}

/// The backward of a fused element-wise chain: every input's gradient from the two
/// inputs the chain checkpointed and the output's gradient (`MicroditBackend::swiglu_backward`,
/// `modulate_backward`, `gated_residual_backward`).
type ChainBackward<B, const N: usize> =
    fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> [FloatTensor<B>; N];

struct Chain<B: MicroditBackend, const N: usize> {
    backward: ChainBackward<B, N>,
}

impl<B: MicroditBackend, const N: usize> std::fmt::Debug for Chain<B, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Chain")
    }
}

impl<B: MicroditBackend, const N: usize> Backward<B, N> for Chain<B, N> {
    /// The two checkpointed inputs the backward reads.
    type State = [NodeId; 2];

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let [a, b] = ops.state.map(|id| checkpointer.retrieve_node_output(id));
        register::<B, N>(
            ops.parents.map(|p| p.map(|node| node.id)),
            (self.backward)(a, b, grad),
            grads,
        );
    }
}

/// One autodiff node for an element-wise chain of `N` inputs: `forward` on the inner
/// backend, and under tracking the inputs at `saved` checkpointed for `backward`.
fn fused_chain<B: MicroditBackend, C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    saved: [usize; 2],
    forward: fn([FloatTensor<B>; N]) -> FloatTensor<B>,
    backward: ChainBackward<B, N>,
) -> FloatTensor<Autodiff<B, C>> {
    let parents = inputs.each_ref().map(|t| t.node.clone());
    let node = Chain { backward };
    match node.prepare::<C>(parents).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let ids = saved.map(|i| prep.checkpoint(&inputs[i]));
            prep.finish(ids, forward(inputs.map(|t| t.primitive)))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(inputs.map(|t| t.primitive))),
    }
}

/// Registers each input's gradient for its parent node (`ops.parents`' ids), if that one
/// is tracked.
fn register<B: MicroditBackend, const N: usize>(
    parents: [Option<NodeId>; N],
    inputs: [FloatTensor<B>; N],
    grads: &mut Gradients,
) {
    for (parent, g) in parents.into_iter().zip(inputs) {
        if let Some(id) = parent {
            grads.register::<B>(id, g);
        }
    }
}
