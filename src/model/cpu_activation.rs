//! The gated MLP's activation on the CPU: `act(gate) * up` in one pass over f32 values,
//! with AVX2 and on our thread pool. candle computes GELU with a libm `tanhf` and SiLU with a
//! libm `expf` per element, on the calling thread only (a tenth of Gemma 3 270M's decode
//! time, and of SmolLM2's at 16 streams). Both are `x / (1 + e^t)`: SiLU with `t = -x`, GELU
//! with `t = -2u` (`0.5 (1 + tanh u)` is the logistic of `2u`), here with the vector `exp`
//! of the attention kernel. Elementwise, so a row's result never depends on the rest of the
//! batch.

use candle_core::{Device, Tensor};

use super::cpu_rows::{f32_values, slice};

use super::config::Activation;

/// sqrt(2 / pi), the tanh approximation's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// Its cubic term's coefficient.
const CUBIC: f32 = 0.044_715;
/// e^88 is finite in f32; larger exponents (deeply negative inputs, whose GELU is 0) are
/// clamped to it.
const MAX_EXP: f32 = 88.0;
/// Values per parallel task: a decode row of most models stays on the calling thread, and
/// 16 rows of SmolLM2 (24k values) split six ways rather than two (one thread idle).
const CHUNK: usize = 4 * 1024;

/// `act(gate) * up` for contiguous f32 CPU tensors of one shape; None for anything else (the
/// caller then uses candle's ops).
pub fn gated(act: Activation, gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if gate.shape() != up.shape() || !gate.device().is_cpu() {
        return Ok(None);
    }
    let (Some(gs), Some(us)) = (f32_values(gate), f32_values(up)) else {
        return Ok(None);
    };
    let (g, u) = (slice(&gs.0, gs.1, gs.2), slice(&us.0, us.1, us.2));
    let mut out = vec![0f32; g.len()];
    let base = super::parallel::SharedOut(out.as_mut_ptr());
    let base = &base;
    super::parallel::par_for(g.len().div_ceil(CHUNK), |tasks| {
        for t in tasks {
            let r = t * CHUNK..((t + 1) * CHUNK).min(g.len());
            // SAFETY: tasks cover disjoint ranges of `out`, each inside its length.
            let o = unsafe { std::slice::from_raw_parts_mut(base.0.add(r.start), r.len()) };
            act_mul(act, &g[r.clone()], &u[r], o);
        }
    });
    Ok(Some(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?))
}

/// `out[i] = act(g[i]) * u[i]`.
fn act_mul(act: Activation, g: &[f32], u: &[f32], out: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::cpu_quant::has_avx2() {
        // SAFETY: AVX2 and FMA were just detected; the slices have one length.
        done = unsafe {
            match act {
                Activation::Silu => x86::act_mul::<false>(g, u, out),
                Activation::GeluTanh => x86::act_mul::<true>(g, u, out),
            }
        };
    }
    let f = match act {
        Activation::Silu => silu,
        Activation::GeluTanh => gelu_tanh,
    };
    for i in done..g.len() {
        out[i] = f(g[i]) * u[i];
    }
}

/// One value, the same formula as the vector code.
fn gelu_tanh(x: f32) -> f32 {
    let t = -2.0 * SQRT_2_OVER_PI * (CUBIC * x * x).mul_add(x, x);
    x / (1.0 + t.min(MAX_EXP).exp())
}

/// One value, the same formula as the vector code.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).min(MAX_EXP).exp())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CUBIC, MAX_EXP, SQRT_2_OVER_PI};
    use std::arch::x86_64::*;

    /// The whole vectors of [`super::act_mul`], GELU or SiLU; returns how many values it
    /// wrote.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `g`, `u` and `out` must have one length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn act_mul<const GELU: bool>(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
        let n = g.len() - g.len() % 8;
        let scale = _mm256_set1_ps(-2.0 * SQRT_2_OVER_PI);
        let (cubic, one, max) = (
            _mm256_set1_ps(CUBIC),
            _mm256_set1_ps(1.0),
            _mm256_set1_ps(MAX_EXP),
        );
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= the length of all three slices.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr().add(i));
                let t = if GELU {
                    let x3 = _mm256_mul_ps(_mm256_mul_ps(cubic, x), x);
                    _mm256_mul_ps(scale, _mm256_fmadd_ps(x3, x, x))
                } else {
                    _mm256_sub_ps(_mm256_setzero_ps(), x)
                };
                let e = crate::model::cpu_attention::x86::exp(_mm256_min_ps(t, max));
                let a = _mm256_div_ps(x, _mm256_add_ps(one, e));
                let y = _mm256_mul_ps(a, _mm256_loadu_ps(u.as_ptr().add(i)));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pseudo_random;

    /// Within f32 rounding of candle's GELU (libm tanh) and SiLU (libm exp) times up, for
    /// inputs from deep in both tails through zero; the vector and scalar paths agree;
    /// non-CPU-f32 inputs are left to candle.
    #[test]
    fn matches_candle() {
        let n = 13 * (CHUNK / 4 + 3);
        let g: Vec<f32> = pseudo_random(n, 1).iter().map(|v| v * 120.0).collect();
        let u = pseudo_random(n, 2);
        let (gt, ut) = (
            Tensor::from_vec(g.clone(), (n / 13, 13), &Device::Cpu).unwrap(),
            Tensor::from_vec(u.clone(), (n / 13, 13), &Device::Cpu).unwrap(),
        );
        let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for (act, candle, scalar) in [
            (
                Activation::GeluTanh,
                gt.gelu().unwrap(),
                gelu_tanh as fn(f32) -> f32,
            ),
            (Activation::Silu, candle_nn::ops::silu(&gt).unwrap(), silu),
        ] {
            let ours = flat(gated(act, &gt, &ut).unwrap().expect("f32 on the CPU"));
            let theirs = flat((candle * &ut).unwrap());
            for i in 0..n {
                let tol = 1e-6 * theirs[i].abs().max(1.0);
                assert!(
                    (ours[i] - theirs[i]).abs() <= tol,
                    "{act:?}({}) * {}: {} vs {}",
                    g[i],
                    u[i],
                    ours[i],
                    theirs[i]
                );
                assert!(
                    (ours[i] - scalar(g[i]) * u[i]).abs() <= tol,
                    "scalar path at {i}"
                );
            }
            assert!(scalar(-200.0).abs() < 1e-30);
            assert_eq!(scalar(200.0), 200.0);
        }
        let f64s = gt.to_dtype(candle_core::DType::F64).unwrap();
        assert!(gated(Activation::Silu, &f64s, &f64s).unwrap().is_none());
        let transposed = gt.t().unwrap();
        assert!(gated(Activation::Silu, &transposed, &transposed)
            .unwrap()
            .is_none());
    }
}
