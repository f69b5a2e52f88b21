//! Projections (q/k/v/o/gate/up/down and the head): a quantized or dense
//! weight and an optional bias.

use super::qmatmul::QMatrix;
use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

/// The seven projections of a decoder layer, in a fixed order so adapters can
/// index them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ProjKind {
    pub const ALL: [ProjKind; 7] = [
        ProjKind::Q,
        ProjKind::K,
        ProjKind::V,
        ProjKind::O,
        ProjKind::Gate,
        ProjKind::Up,
        ProjKind::Down,
    ];

    /// The Hugging Face name (`q_proj` …), used in adapter files and settings.
    pub fn hf_name(self) -> &'static str {
        match self {
            ProjKind::Q => "q_proj",
            ProjKind::K => "k_proj",
            ProjKind::V => "v_proj",
            ProjKind::O => "o_proj",
            ProjKind::Gate => "gate_proj",
            ProjKind::Up => "up_proj",
            ProjKind::Down => "down_proj",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.hf_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A weight matrix of shape (out, in), stored as the checkpoint gave it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// GGUF block-quantized (or f16/f32 GGUF tensors, which candle keeps dense).
    Quantized(QMatMul),
    /// GGUF Q4_1 or Q8_0, through our batched SIMD kernels.
    Blocks(QMatrix),
    /// f32, from safetensors.
    Dense(Tensor),
}

impl Weight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Blocks(w) => w.forward(x)?,
            Weight::Dense(w) => x.matmul(&w.t()?)?,
        })
    }

    /// The weight as a dense f32 (out, in) tensor.
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(candle_core::DType::F32)?
            }
            Weight::Blocks(w) => w.dequantize(&candle_core::Device::Cpu)?,
            Weight::Dense(t) => t.clone(),
        })
    }

    /// (out, in)
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Quantized(QMatMul::QTensor(t)) => t.shape().dims().to_vec(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims().to_vec(),
            Weight::Blocks(w) => vec![w.shape().0, w.shape().1],
            Weight::Dense(t) => t.dims().to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Proj {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Proj {
    /// x: (rows, in) → (rows, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections of the same input: quantized-block weights run as one pass
/// (one quantization of the input, one parallel dispatch), others one by one.
pub fn forward_many(projs: &[&Proj], x: &Tensor) -> Result<Vec<Tensor>> {
    let blocks: Option<Vec<&QMatrix>> = projs
        .iter()
        .map(|p| match &p.weight {
            Weight::Blocks(m) => Some(m),
            _ => None,
        })
        .collect();
    let Some(mats) = blocks.filter(|m| m.len() > 1) else {
        return projs.iter().map(|p| p.forward(x)).collect();
    };
    let ys = super::qmatmul::forward_many(&mats, x)?;
    ys.into_iter()
        .zip(projs)
        .map(|(y, p)| {
            Ok(match &p.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        })
        .collect()
}

/// Projections of the same input, on plain rows (xs: rows × in), returning
/// plain rows: for callers that work on rows anyway (attention), this skips
/// two tensor copies per projection.
pub fn forward_many_rows(projs: &[&Proj], x: &Tensor, xs: &[f32]) -> Result<Vec<Vec<f32>>> {
    let rows = x.dim(0)?;
    match block_matrices(projs) {
        Some(mats) => super::qmatmul::forward_rows(&mats, xs, rows),
        None => forward_many(projs, x)?
            .into_iter()
            .map(|t| {
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            })
            .collect(),
    }
}

/// As `forward_many_rows`, with `beside` run in the same parallel pass (see
/// [`super::qmatmul::forward_rows_beside`]), or beside the projections
/// where they are not all block matrices.
pub fn forward_many_rows_beside<T: Send + Sync>(
    projs: &[&Proj],
    x: &Tensor,
    xs: &[f32],
    beside: &super::qmatmul::Beside<T>,
) -> Result<(Vec<Vec<f32>>, T)> {
    let rows = x.dim(0)?;
    match block_matrices(projs) {
        Some(mats) => super::qmatmul::forward_rows_beside(&mats, xs, rows, beside),
        None => {
            let (ys, value) = rayon::join(|| forward_many_rows(projs, x, xs), beside);
            Ok((ys?, value))
        }
    }
}

/// The projections' weights when all are block matrices without a bias.
fn block_matrices<'a>(projs: &[&'a Proj]) -> Option<Vec<&'a QMatrix>> {
    projs
        .iter()
        .map(|p| match (&p.weight, &p.bias) {
            (Weight::Blocks(m), None) => Some(m),
            _ => None,
        })
        .collect()
}
