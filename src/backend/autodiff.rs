//! microdit's operations under autodiff, each one node with its own backward: the matrix
//! product (so the gradients' products are as precise as the forward's) and attention
//! (the inner backend's forward and backward; the probabilities are recomputed, not kept).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{broadcast_shape, Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorMetadata};

use super::Backend;

impl<B: Backend, C: CheckpointStrategy> Backend for Autodiff<B, C> {
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Matmul;

        impl<B: Backend> Backward<B, 2> for Matmul {
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

        impl<B: Backend> Backward<B, 3> for Attention {
            /// The checkpointed q, k, v and whether the attention is causal.
            type State = ([NodeId; 3], bool);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (ids, causal) = ops.state;
                let [q, k, v] = ids.map(|id| checkpointer.retrieve_node_output(id));
                let inputs = B::scaled_dot_attention_backward(q, k, v, grad, causal);
                for (parent, g) in ops.parents.into_iter().zip(inputs) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match Attention
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&q, &k, &v].map(|t| prep.checkpoint(t));
                let out = B::scaled_dot_attention(q.primitive, k.primitive, v.primitive, causal);
                prep.finish((ids, causal), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::scaled_dot_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                causal,
            )),
        }
    }
}
