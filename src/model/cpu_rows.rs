//! The decoder's small per-row ops on the CPU's f32 rows, without candle's detours, with
//! candle's arithmetic (so results are bit for bit candle's):
//! - rotary embedding: candle's `rope_thd` hands every call to rayon's pool (a thread switch
//!   there and back, twice a layer) and wants a contiguous copy of its input;
//! - the residual add and the RMS norm after it, in one pass: candle makes each a tensor op
//!   with its own output and, past 32 rows, its own trip through rayon.
//!
//! The norm and the rotation run on our pool by rows: a decode step's single row stays on
//! the calling thread.

use candle_core::{CpuStorage, Device, Storage, Tensor};

use super::parallel::par_rows;

/// The storage of a contiguous f32 CPU tensor (read-locked) and where its values lie in it;
/// None for anything else. [`slice`] gives the values.
pub(super) fn f32_values(
    t: &Tensor,
) -> Option<(impl std::ops::Deref<Target = Storage> + '_, usize, usize)> {
    let (s, l) = t.storage_and_layout();
    let (a, b) = l.contiguous_offsets()?;
    matches!(&*s, Storage::Cpu(CpuStorage::F32(_))).then_some((s, a, b))
}

/// The values a guard from [`f32_values`] holds.
pub(super) fn slice(s: &Storage, a: usize, b: usize) -> &[f32] {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => &v[a..b],
        _ => &[],
    }
}

/// `f` on a tensor's values as contiguous f32 on the CPU: borrowed when they already are (the
/// decoder's activations), else a converted copy.
pub(super) fn with_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if let Some((s, a, b)) = f32_values(t) {
        return f(slice(&s, a, b));
    }
    f(&t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// `x + delta` (`[rows, hidden]`), and candle's `rms_norm` of that times `weight`
/// (`[hidden]`): `v / sqrt(mean(v^2) + eps) * w`, the sum of squares added in order. All
/// f32, contiguous, on the CPU; None for anything else (the caller then uses candle's ops).
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let Ok((rows, hidden)) = x.dims2() else {
        return Ok(None);
    };
    if !x.device().is_cpu() || delta.dims() != x.dims() || weight.dims() != [hidden] {
        return Ok(None);
    }
    let (Some(xs), Some(ds), Some(ws)) = (f32_values(x), f32_values(delta), f32_values(weight))
    else {
        return Ok(None);
    };
    let (xv, dv, w) = (
        slice(&xs.0, xs.1, xs.2),
        slice(&ds.0, ds.1, ds.2),
        slice(&ws.0, ws.1, ws.2),
    );
    // The add is one cheap pass: on this thread, with no zeroed buffer to fill first.
    let sum: Vec<f32> = xv.iter().zip(dv).map(|(&a, &b)| a + b).collect();
    let mut normed = vec![0f32; rows * hidden];
    let sum_rows = &sum;
    par_rows(&mut normed, hidden, |r, n| {
        let s = &sum_rows[r * hidden..(r + 1) * hidden];
        let sum2 = s.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / hidden as f32 + eps).sqrt();
        for ((n, &v), &a) in n.iter_mut().zip(s).zip(w) {
            *n = v / m * a;
        }
    });
    let dev = Device::Cpu;
    Ok(Some((
        Tensor::from_vec(sum, (rows, hidden), &dev)?,
        Tensor::from_vec(normed, (rows, hidden), &dev)?,
    )))
}

/// Neox-style rotation of `x` `[tokens, heads, head_dim]` (f32 on the CPU, each token's
/// heads contiguous) by `cos`/`sin` `[tokens, head_dim / 2]` (f32, contiguous): a new
/// contiguous tensor. None for anything else (the caller then uses candle's op).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Ok((n, heads, hd)) = x.dims3() else {
        return Ok(None);
    };
    if !x.device().is_cpu() || hd % 2 != 0 || cos.dims() != [n, hd / 2] || sin.dims() != cos.dims()
    {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xv)), Some(cs), Some(ss)) =
        (&*xs, f32_values(cos), f32_values(sin))
    else {
        return Ok(None);
    };
    // Each token's heads must be one run of values; tokens may be any distance apart.
    let [t_stride, h_stride, d_stride] = xl.stride() else {
        return Ok(None);
    };
    if *d_stride != 1 || *h_stride != hd {
        return Ok(None);
    }
    let (t_stride, start, row) = (*t_stride, xl.start_offset(), heads * hd);
    let (cos, sin) = (slice(&cs.0, cs.1, cs.2), slice(&ss.0, ss.1, ss.2));
    let mut out = vec![0f32; n * row];
    let half = hd / 2;
    par_rows(&mut out, row, |t, dst| {
        let src = &xv[start + t * t_stride..][..row];
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for (src, dst) in src.chunks_exact(hd).zip(dst.chunks_exact_mut(hd)) {
            let (x1, x2) = src.split_at(half);
            let (d1, d2) = dst.split_at_mut(half);
            for i in 0..half {
                d1[i] = x1[i] * c[i] - x2[i] * s[i];
                d2[i] = x1[i] * s[i] + x2[i] * c[i];
            }
        }
    });
    Ok(Some(Tensor::from_vec(out, (n, heads, hd), &Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// A tensor's f32 values as bits: equal means bit for bit.
    fn bits(t: &Tensor) -> candle_core::Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    }

    /// Equal, bit for bit, to candle's `rope_thd`, for contiguous input and for a narrowed
    /// view whose tokens are further apart than their heads.
    #[test]
    fn equals_candles_rope() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for n in [1usize, 3, 130] {
            let (heads, hd) = (3, 8);
            let wide = Tensor::randn(0f32, 1.0, (n, heads + 1, hd), &dev)?;
            let x = wide.narrow(1, 1, heads)?;
            let angles = Tensor::randn(0f32, 3.0, (n, hd / 2), &dev)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let ours = rope(&x, &cos, &sin)?.expect("f32 rows on the CPU");
            let theirs =
                candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &cos, &sin)?
                    .squeeze(0)?;
            assert_eq!(bits(&ours)?, bits(&theirs)?, "n={n}");
        }
        let half = Tensor::zeros((1, 2, 4), DType::F16, &dev)?;
        let cs = Tensor::zeros((1, 2), DType::F32, &dev)?;
        assert!(rope(&half, &cs, &cs)?.is_none(), "f16 is left to candle");
        Ok(())
    }

    /// Equal, bit for bit, to candle's add then `rms_norm`, for one row and for enough rows
    /// to run on the pool.
    #[test]
    fn add_rms_norm_equals_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for rows in [1usize, 200] {
            let x = Tensor::randn(0f32, 2.0, (rows, 96), &dev)?;
            let d = Tensor::randn(0f32, 1.0, (rows, 96), &dev)?;
            let w = Tensor::randn(1f32, 0.5, 96, &dev)?;
            let (s, n) = add_rms_norm(&x, &d, &w, 1e-5)?.expect("f32 rows on the CPU");
            let sum = (&x + &d)?;
            let theirs = candle_nn::ops::rms_norm(&sum, &w, 1e-5)?;
            assert_eq!(bits(&s)?, bits(&sum)?, "rows={rows}");
            assert_eq!(bits(&n)?, bits(&theirs)?, "rows={rows}");
        }
        let half = Tensor::zeros((1, 4), DType::F16, &dev)?;
        let w = Tensor::zeros(4, DType::F16, &dev)?;
        assert!(
            add_rms_norm(&half, &half, &w, 1e-5)?.is_none(),
            "f16 is left to candle"
        );
        Ok(())
    }
}
