//! The transformer encoder block both vision towers are made of (SigLIP's and Qwen3-VL's):
//! layer norm, full attention over the image's patches (with Qwen's 2-D rotary embedding
//! when given), layer norm, MLP; the projections row-split on our CPU pool and the
//! attention one head per work item, since an image is hundreds to thousands of rows
//! through hundreds of millions of parameters.

use candle_core::Tensor;
use candle_nn::{Activation, VarBuilder};

use super::super::parallel::par_map;
use super::super::weights::Linear;
use super::super::{Error, Result};

/// A layer norm's weight and bias.
pub(super) struct Norm(Tensor, Tensor);

impl Norm {
    pub fn load(vb: &VarBuilder, name: &str, width: usize) -> Result<Self> {
        Ok(Self(
            vb.get(width, &format!("{name}.weight"))?,
            vb.get(width, &format!("{name}.bias"))?,
        ))
    }

    pub fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.0, &self.1, eps as f32)?)
    }
}

/// A projection with bias, `[out, inp]` as transformers stores it.
pub(super) fn linear(vb: &VarBuilder, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Linear::dense(
        vb.get((out, inp), &format!("{name}.weight"))?,
        Some(vb.get(out, &format!("{name}.bias"))?),
    )
}

pub(super) struct Block {
    pub norm1: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub norm2: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// How a tower's blocks compute: heads, norm epsilon and the MLP's activation.
pub(super) struct Shape {
    pub heads: usize,
    pub eps: f64,
    pub act: Activation,
}

impl Block {
    /// `x`: `[patches, width]`; `rope`: per patch the cos and sin `[patches, head_dim / 2]`
    /// of its rotary angles.
    pub fn forward(
        &self,
        x: &Tensor,
        s: &Shape,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let h = self.norm1.forward(x, s.eps)?;
        let (q, k, v) = (
            self.q.forward(&h)?,
            self.k.forward(&h)?,
            self.v.forward(&h)?,
        );
        let attn = attention(&q, &k, &v, s.heads, rope)?;
        let x = (x + self.out.forward(&attn)?)?;
        let h = self
            .fc1
            .forward(&self.norm2.forward(&x, s.eps)?)?
            .apply(&s.act)?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// Full (bidirectional) attention of `[n, width]` queries, keys and values, one head per
/// work item on the CPU pool; `rope` turns queries and keys first (rotate-half layout).
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    rope: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    let (n, width) = q.dims2()?;
    let d = width / heads;
    let turn = |t: Tensor| -> candle_core::Result<Tensor> {
        match rope {
            Some((cos, sin)) => candle_nn::rotary_emb::rope_thd(
                &t.reshape((1, n, heads, d))?.contiguous()?,
                cos,
                sin,
            )?
            .reshape((n, width)),
            None => Ok(t),
        }
    };
    let (q, k) = (turn(q.clone())?, turn(k.clone())?);
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.reshape((n, heads, d))?.transpose(0, 1)?.contiguous()
    };
    let (q, k, v) = (split(&(q * (d as f64).powf(-0.5))?)?, split(&k)?, split(v)?);
    let head = |h: usize| -> candle_core::Result<Tensor> {
        let (qh, kh, vh) = (q.get(h)?, k.get(h)?, v.get(h)?);
        let scores = qh.matmul(&kh.t()?)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&vh)
    };
    let heads_out = par_map(heads, head)
        .into_iter()
        .map(|t| match t {
            Some(t) => Ok(t?),
            None => Err(Error::Config(
                "a vision attention head did not finish".into(),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    // [heads, n, d] -> [n, heads * d]
    Ok(Tensor::stack(&heads_out, 0)?
        .transpose(0, 1)?
        .reshape((n, width))?)
}
