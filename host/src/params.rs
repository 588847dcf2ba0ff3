//! Named f32 tensors: the model's parameters, its gradients, and anything else laid
//! out the same way (Adam moments, reference deltas). Tensors are kept in canonical
//! order (ascending by name, bytewise) so that every consumer (optimizer, checkpoint,
//! global top-k) sees the same order.

/// One named tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A set of named tensors in canonical (name-sorted) order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamSet {
    pub tensors: Vec<Tensor>,
}

impl ParamSet {
    /// Builds a set from tensors in any order; sorts them into canonical order.
    pub fn new(mut tensors: Vec<Tensor>) -> Self {
        tensors.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Self { tensors }
    }

    /// A set with the same names and shapes, every element zero.
    pub fn zeros_like(&self) -> Self {
        let tensors = self
            .tensors
            .iter()
            .map(|t| Tensor { name: t.name.clone(), shape: t.shape.clone(), data: vec![0.0; t.data.len()] })
            .collect();
        Self { tensors }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}
