//! The Rust side of the CPU execution layer (kernels/sim/): runs a `Launch` of a
//! kernels/*.cu kernel on CPU tensors, with the GPU's semantics and stricter checks than a
//! GPU gives. Built only without the `cuda` feature; `cargo test` runs every kernel here.
//!
//! Each tensor argument is staged into memory of its own, fenced by inaccessible pages and
//! canary bytes: a kernel that reads or writes past an argument faults (the launch fails
//! naming the argument) or leaves a canary changed. The staged copy keeps the pointer's
//! alignment modulo 16, so misaligned vector loads trap as they fault on the GPU. After the
//! launch, inputs must be unchanged, outputs are copied back element by element of their
//! view (a write outside the view, into a neighbouring view of the same storage, is an
//! error), and, unless `WICK_SIM_RACECHECK=0`, the kernel runs a second time with the blocks
//! and each block's threads scheduled in reverse order and must give the same bytes: a
//! missing `__syncthreads()` or another race between threads shows up as a difference.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use half::f16;

use super::launch::{Arg, Launch};
use super::{KernelError, Result};

#[cfg(not(target_endian = "little"))]
compile_error!("the CPU execution layer passes scalar arguments little-endian");

const ARG_INT: u32 = 0;
const ARG_FLOAT: u32 = 1;
const ARG_PTR_IN: u32 = 2;
const ARG_PTR_OUT: u32 = 3;
const ARG_PTR_NULL: u32 = 4;
const FLAG_REVERSE: u32 = 1;

/// kernels/sim/sim_abi.h's `WickSimArg`.
#[repr(C)]
struct SimArg {
    value: *const c_void,
    size: u32,
    kind: u32,
    elem_size: u32,
    reserved: u32,
    name: *const c_char,
    lo: u64,
    hi: u64,
}

extern "C" {
    fn wick_sim_launch(
        kernel: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *const SimArg,
        nargs: usize,
        flags: u32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn wick_sim_kernel_name(i: usize) -> *const c_char;
    fn wick_sim_launch_count(i: usize) -> u64;
}

/// 0: from WICK_SIM_RACECHECK (default on), 1: on, 2: off.
static RACE_CHECK: AtomicU8 = AtomicU8::new(0);

/// Turns the second, reverse-order run of every launch on or off for this process
/// (overrides `WICK_SIM_RACECHECK`).
pub fn set_race_check(on: bool) {
    RACE_CHECK.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

fn race_check() -> bool {
    match RACE_CHECK.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => std::env::var("WICK_SIM_RACECHECK").map_or(true, |v| v != "0"),
    }
}

thread_local! {
    static INJECT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// While alive, every kernel launched on this thread whose name starts with the given
/// prefix returns a wrong result (1 added to each element of its first output): how tests
/// prove that a check downstream notices a broken kernel.
pub struct FaultInjection(());

/// Makes kernels named `prefix...` on this thread produce wrong results until the returned
/// guard is dropped.
pub fn inject_fault(prefix: &str) -> FaultInjection {
    INJECT.with(|i| *i.borrow_mut() = Some(prefix.to_string()));
    FaultInjection(())
}

impl Drop for FaultInjection {
    fn drop(&mut self) {
        INJECT.with(|i| *i.borrow_mut() = None);
    }
}

/// Every kernel the layer can run, with how often this process launched it.
pub fn launch_counts() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for i in 0.. {
        // SAFETY: wick_sim_kernel_name returns null past the end or a pointer to a static
        // NUL-terminated name; wick_sim_launch_count only reads an atomic counter.
        let (name, count) = unsafe {
            let p = wick_sim_kernel_name(i);
            if p.is_null() {
                break;
            }
            (
                CStr::from_ptr(p).to_string_lossy().into_owned(),
                wick_sim_launch_count(i),
            )
        };
        out.push((name, count));
    }
    out
}

/// A fresh CPU tensor filled with all-ones bit patterns (NaN for floats).
pub(super) fn poisoned(dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let dev = &candle_core::Device::Cpu;
    Ok(match dtype {
        DType::F16 => Tensor::from_vec(vec![f16::from_bits(u16::MAX); n], shape, dev)?,
        DType::F32 => Tensor::from_vec(vec![f32::from_bits(u32::MAX); n], shape, dev)?,
        DType::U32 => Tensor::from_vec(vec![u32::MAX; n], shape, dev)?,
        other => {
            return Err(KernelError::Sim(format!(
                "no uninitialised allocation for {other:?}"
            )))
        }
    })
}

/// The bytes of a CPU storage, and its element size.
fn storage_bytes(s: &CpuStorage) -> Option<(&[u8], usize)> {
    fn raw<T>(v: &[T]) -> (&[u8], usize) {
        // SAFETY: T is one of the plain numeric element types below (no padding, every bit
        // pattern readable as bytes); the byte slice covers exactly the same memory.
        let b = unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
        };
        (b, std::mem::size_of::<T>())
    }
    Some(match s {
        CpuStorage::U8(v) => raw(v),
        CpuStorage::U32(v) => raw(v),
        CpuStorage::I64(v) => raw(v),
        CpuStorage::F16(v) => raw(v),
        CpuStorage::F32(v) => raw(v),
        CpuStorage::F64(v) => raw(v),
        _ => return None,
    })
}

fn storage_bytes_mut(s: &mut CpuStorage) -> Option<&mut [u8]> {
    fn raw<T>(v: &mut [T]) -> &mut [u8] {
        // SAFETY: as in storage_bytes, and every byte pattern written is a valid T (plain
        // numbers, no invalid representations).
        unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v))
        }
    }
    Some(match s {
        CpuStorage::U8(v) => raw(v),
        CpuStorage::U32(v) => raw(v),
        CpuStorage::I64(v) => raw(v),
        CpuStorage::F16(v) => raw(v),
        CpuStorage::F32(v) => raw(v),
        CpuStorage::F64(v) => raw(v),
        _ => return None,
    })
}

/// The elements `[start, end)` of the storage a view reaches.
fn span(l: &Layout) -> (usize, usize) {
    let start = l.start_offset();
    if l.shape().elem_count() == 0 {
        return (start, start);
    }
    let reach: usize = l
        .dims()
        .iter()
        .zip(l.stride())
        .map(|(&d, &s)| (d - 1) * s)
        .sum();
    (start, start + reach + 1)
}

/// The view's elements as contiguous runs `(offset from the span's start, length)`.
fn runs(l: &Layout) -> Vec<(usize, usize)> {
    if l.shape().elem_count() == 0 {
        return Vec::new();
    }
    let (dims, stride) = (l.dims(), l.stride());
    let mut k = dims.len();
    let mut block = 1;
    while k > 0 && (dims[k - 1] == 1 || stride[k - 1] == block) {
        block *= dims[k - 1];
        k -= 1;
    }
    let outer = &dims[..k];
    let count: usize = outer.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; k];
    for _ in 0..count {
        let off: usize = idx.iter().zip(stride).map(|(i, s)| i * s).sum();
        out.push((off, block));
        for d in (0..k).rev() {
            idx[d] += 1;
            if idx[d] < outer[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

const CANARY: u8 = 0xa5;

/// A copy of an argument's bytes in pages of its own, fenced by inaccessible pages with
/// canary bytes in the slack between.
struct Guarded {
    map: *mut u8,
    map_len: usize,
    /// The first data page (canaries from here to `data`).
    body: *mut u8,
    data: *mut u8,
    len: usize,
    /// The trailing inaccessible page (canaries from `data + len` to here).
    end: *mut u8,
}

impl Guarded {
    /// `misalign`: the data's address modulo 16, as it would be on the GPU.
    fn new(bytes: &[u8], misalign: usize) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let body_len = (bytes.len() + 32).div_ceil(page) * page;
        let map_len = body_len + 2 * page;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(KernelError::Sim(format!(
                "cannot map {map_len} bytes for an argument"
            )));
        }
        let map = map.cast::<u8>();
        // SAFETY: all pointers below stay inside the mapping of `map_len` bytes: the body is
        // pages 1..=body pages, `data` is at most 16 + len bytes below its end and at least
        // 16 bytes above its start (body_len >= len + 32).
        unsafe {
            let body = map.add(page);
            let end = body.add(body_len);
            libc::mprotect(map.cast(), page, libc::PROT_NONE);
            libc::mprotect(end.cast(), page, libc::PROT_NONE);
            let last = end as usize - bytes.len();
            let data_addr = ((last - misalign) & !15) + misalign;
            let data = body.add(data_addr - body as usize);
            std::ptr::write_bytes(body, CANARY, body_len);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
            Ok(Self {
                map,
                map_len,
                body,
                data,
                len: bytes.len(),
                end,
            })
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `data..data + len` is inside the readable body and initialised in `new`.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.data, self.len) }
    }

    /// Whether the canaries around the data are intact: (before, after).
    fn canaries(&self) -> (bool, bool) {
        // SAFETY: body..data and data+len..end are inside the readable body.
        unsafe {
            let before =
                std::slice::from_raw_parts(self.body, self.data as usize - self.body as usize);
            let tail = self.data.add(self.len);
            let after = std::slice::from_raw_parts(tail, self.end as usize - tail as usize);
            (
                before.iter().all(|&b| b == CANARY),
                after.iter().all(|&b| b == CANARY),
            )
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; nothing borrows it any more.
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}

/// One tensor argument, staged.
struct Staged<'a> {
    tensor: &'a Tensor,
    what: &'static str,
    out: bool,
    buf: Guarded,
    /// The original bytes of the span (to check what the kernel must not change).
    orig: Vec<u8>,
    span_start_bytes: usize,
    elem: usize,
    runs: Vec<(usize, usize)>,
}

fn stage<'a>(t: &'a Tensor, what: &'static str, out: bool, op: &str) -> Result<Staged<'a>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*storage else {
        return Err(KernelError::Sim(format!(
            "{op}: {what} is not a CPU tensor"
        )));
    };
    let (bytes, elem) = storage_bytes(cs).ok_or_else(|| {
        KernelError::Sim(format!(
            "{op}: {what} has dtype {:?}, which no kernel takes",
            t.dtype()
        ))
    })?;
    let (s, e) = span(layout);
    let orig = bytes[s * elem..e * elem].to_vec();
    let buf = Guarded::new(&orig, (s * elem) % 16)?;
    Ok(Staged {
        tensor: t,
        what,
        out,
        buf,
        orig,
        span_start_bytes: s * elem,
        elem,
        runs: runs(layout),
    })
}

/// Copies an output's view back into its tensor.
struct CopyBack<'a> {
    src: &'a [u8],
    start: usize,
    elem: usize,
    runs: &'a [(usize, usize)],
}

impl InplaceOp1 for CopyBack<'_> {
    fn name(&self) -> &'static str {
        "wick-sim-copy-back"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        let dst = storage_bytes_mut(s)
            .ok_or_else(|| candle_core::Error::Msg("copy back: unsupported dtype".into()))?;
        for &(off, len) in self.runs {
            let (a, n) = (off * self.elem, len * self.elem);
            dst[self.start + a..self.start + a + n].copy_from_slice(&self.src[a..a + n]);
        }
        Ok(())
    }
}

/// Adds 1 to every element of a staged output (fault injection).
fn corrupt(s: &mut Staged) {
    let dtype = s.tensor.dtype();
    let elem = s.elem;
    let runs = s.runs.clone();
    let b = s.buf.bytes_mut();
    for (off, len) in runs {
        for i in off..off + len {
            let x = &mut b[i * elem..(i + 1) * elem];
            match dtype {
                DType::F16 => {
                    let v = f16::from_le_bytes([x[0], x[1]]).to_f32() + 1.0;
                    x.copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
                DType::F32 => {
                    let v = f32::from_le_bytes([x[0], x[1], x[2], x[3]]) + 1.0;
                    x.copy_from_slice(&v.to_le_bytes());
                }
                DType::U32 => {
                    let v = u32::from_le_bytes([x[0], x[1], x[2], x[3]]).wrapping_add(1);
                    x.copy_from_slice(&v.to_le_bytes());
                }
                _ => x[0] ^= 1,
            }
        }
    }
}

/// The tensors of `l`, staged, and the argument array pointing at them.
struct Prepared<'a> {
    staged: Vec<Staged<'a>>,
    /// Each argument's value (pointers and scalars, little-endian in 8 bytes).
    values: Vec<u64>,
    names: Vec<CString>,
}

fn prepare<'a>(l: &Launch<'a>) -> Result<Prepared<'a>> {
    let mut staged = Vec::new();
    let mut values = Vec::with_capacity(l.args.len());
    let mut names = Vec::with_capacity(l.args.len());
    for a in &l.args {
        let (v, name) = match *a {
            Arg::In(t, what) | Arg::Out(t, what) => {
                let s = stage(t, what, matches!(a, Arg::Out(..)), l.op)?;
                let v = s.buf.data as u64;
                staged.push(s);
                (v, what)
            }
            Arg::Null(what) => (0, what),
            Arg::I32(v) => (v as u32 as u64, "i32"),
            Arg::I64(v) => (v as u64, "i64"),
            Arg::F32(v) => (v.to_bits() as u64, "f32"),
        };
        values.push(v);
        names.push(CString::new(name).map_err(|e| KernelError::Sim(e.to_string()))?);
    }
    Ok(Prepared {
        staged,
        values,
        names,
    })
}

fn run_once(l: &Launch, p: &Prepared, flags: u32) -> Result<()> {
    let mut args = Vec::with_capacity(l.args.len());
    let mut si = 0;
    for (i, a) in l.args.iter().enumerate() {
        let value = (&p.values[i] as *const u64).cast::<c_void>();
        let name = p.names[i].as_ptr();
        let plain = |size: u32, kind: u32| SimArg {
            value,
            size,
            kind,
            elem_size: 0,
            reserved: 0,
            name,
            lo: 0,
            hi: 0,
        };
        args.push(match a {
            Arg::In(..) | Arg::Out(..) => {
                let s = &p.staged[si];
                si += 1;
                SimArg {
                    value,
                    size: 8,
                    kind: if s.out { ARG_PTR_OUT } else { ARG_PTR_IN },
                    elem_size: s.elem as u32,
                    reserved: 0,
                    name,
                    lo: s.buf.data as u64,
                    hi: s.buf.data as u64 + s.buf.len as u64,
                }
            }
            Arg::Null(_) => plain(8, ARG_PTR_NULL),
            Arg::I32(_) => plain(4, ARG_INT),
            Arg::I64(_) => plain(8, ARG_INT),
            Arg::F32(_) => plain(4, ARG_FLOAT),
        });
    }
    let kernel = CString::new(l.kernel.as_str()).map_err(|e| KernelError::Sim(e.to_string()))?;
    let grid = [l.grid.0, l.grid.1, l.grid.2];
    let block = [l.block, 1, 1];
    let mut err = vec![0 as c_char; 4096];
    // SAFETY: every pointer passed is valid for the call: the names and kernel are
    // NUL-terminated CStrings, `args` has `args.len()` entries whose `value`s point into
    // `p.values` (8 bytes each, at least the declared size), and each staged pointer value
    // addresses a live `Guarded` mapping of `hi - lo` bytes. The C++ side checks the
    // argument list against the kernel's signature before running it, and runs it
    // synchronously; faults inside the kernel are caught there and reported as errors.
    let rc = unsafe {
        wick_sim_launch(
            kernel.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            args.as_ptr(),
            args.len(),
            flags,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the C++ side wrote a NUL-terminated message into `err` (snprintf).
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(KernelError::Sim(format!(
            "{} (kernels/{}.cu): {msg}",
            l.op, l.module
        )));
    }
    Ok(())
}

/// Checks what a run left behind: canaries, unchanged inputs, outputs written only inside
/// their view.
fn check_after(l: &Launch, p: &Prepared) -> Result<()> {
    for s in &p.staged {
        let fail = |m: String| {
            Err(KernelError::Sim(format!(
                "{} ({}): {}: {m}",
                l.op, l.kernel, s.what
            )))
        };
        match s.buf.canaries() {
            (false, _) => return fail("the kernel wrote before the start of the argument".into()),
            (_, false) => return fail("the kernel wrote past the end of the argument".into()),
            _ => {}
        }
        let now = s.buf.bytes();
        if !s.out {
            if let Some(i) = now.iter().zip(&s.orig).position(|(a, b)| a != b) {
                return fail(format!("an input was modified (byte {i})"));
            }
        } else {
            // Bytes of the span outside the view must be as they were.
            let mut in_view = vec![false; s.orig.len() / s.elem.max(1)];
            for &(off, len) in &s.runs {
                in_view[off..off + len].fill(true);
            }
            for (e, inside) in in_view.iter().enumerate() {
                let r = e * s.elem..(e + 1) * s.elem;
                if !inside && now[r.clone()] != s.orig[r] {
                    return fail(format!(
                        "the kernel wrote element {e} of the storage span, outside the view"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs `l` on the CPU layer and writes its outputs back into their tensors.
pub(super) fn launch(l: &Launch) -> Result<()> {
    let mut p = prepare(l)?;
    run_once(l, &p, 0)?;
    check_after(l, &p)?;
    if race_check() {
        let q = prepare(l)?;
        run_once(l, &q, FLAG_REVERSE)?;
        check_after(l, &q)?;
        for (a, b) in p.staged.iter().zip(&q.staged).filter(|(a, _)| a.out) {
            if let Some(i) = a
                .buf
                .bytes()
                .iter()
                .zip(b.buf.bytes())
                .position(|(x, y)| x != y)
            {
                return Err(KernelError::Sim(format!(
                    "{} ({}): {}: the result depends on the order the threads run in (byte \
                     {i} differs when each block runs its last thread first): a missing \
                     __syncthreads() or a race between threads",
                    l.op, l.kernel, a.what
                )));
            }
        }
    }
    let inject = INJECT.with(|i| {
        i.borrow()
            .as_ref()
            .is_some_and(|prefix| l.kernel.starts_with(prefix.as_str()))
    });
    if inject {
        if let Some(s) = p.staged.iter_mut().find(|s| s.out) {
            corrupt(s);
        }
    }
    for s in p.staged.iter().filter(|s| s.out) {
        s.tensor.inplace_op1(&CopyBack {
            src: s.buf.bytes(),
            start: s.span_start_bytes,
            elem: s.elem,
            runs: &s.runs,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The layer itself: warp operations, fp16 rounding and atomics against known answers,
    //! and a deliberately broken kernel (kernels/sim/selftest.cu) for each check it makes.

    use super::*;
    use candle_core::Device;

    fn zeros_i32(n: usize) -> Tensor {
        // u32 storage holds the kernel's int results (same size).
        Tensor::zeros(n, DType::U32, &Device::Cpu).expect("alloc")
    }

    fn err_of(r: Result<()>) -> String {
        match r {
            Ok(()) => String::from("(no error)"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn warp_shuffles_votes_and_block_sums_match_cuda() {
        let n = 96; // three warps
        let rows = 16;
        let out = zeros_i32(rows * n);
        Launch::new(
            "test",
            "simtest",
            "wick_simtest_warp_ops",
            (1, 1, 1),
            n as u32,
        )
        .output(&out, "out")
        .i32(n as i32)
        .run()
        .expect("launch");
        let got: Vec<u32> = out.to_vec1().expect("read");
        let got = |op: usize, t: usize| got[op * n + t] as i32;
        for t in 0..n {
            let lane = t % 32;
            let warp0 = t - lane;
            let mut k = 0;
            for width in [32usize, 16, 8] {
                let seg = lane & !(width - 1);
                let val = |l: usize| ((warp0 + l) * 10) as i32;
                let xor = if (lane ^ 5) < seg + width {
                    lane ^ 5
                } else {
                    lane
                };
                let down = if lane + 3 < seg + width {
                    lane + 3
                } else {
                    lane
                };
                let up = if lane >= seg + 3 { lane - 3 } else { lane };
                let idx = seg + (7 & (width - 1));
                for (want, what) in [(xor, "xor"), (down, "down"), (up, "up"), (idx, "idx")] {
                    assert_eq!(got(k, t), val(want), "{what} width {width} thread {t}");
                    k += 1;
                }
            }
            assert_eq!(got(k, t) as u32, 0xaaaa_aaaa, "ballot thread {t}");
            let warp_sum: usize = (warp0..warp0 + 32).sum();
            assert_eq!(got(k + 1, t), warp_sum as i32, "warp sum thread {t}");
            assert_eq!(
                got(k + 2, t),
                (0..n).sum::<usize>() as i32,
                "block sum thread {t}"
            );
            assert_eq!(got(k + 3, t), (0..n).filter(|i| i % 3 == 0).count() as i32);
        }
    }

    #[test]
    fn half_conversions_and_arithmetic_round_as_the_gpu() {
        // Every fp16 bit pattern as float (round trip), then ties, subnormals, overflow,
        // NaN, and pseudo-random floats over the whole range.
        let mut x: Vec<f32> = (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect();
        for b in 0..=u16::MAX {
            let lo = f16::from_bits(b).to_f32();
            let hi = f16::from_bits(b.wrapping_add(1)).to_f32();
            if lo.is_finite() && hi.is_finite() && (lo < hi) {
                x.push((lo + hi) / 2.0); // exactly halfway: ties to even
            }
        }
        x.extend([
            65504.0,
            65519.99,
            65520.0,
            1e9,
            -1e9,
            2.9802322e-8,
            2.9802326e-8,
            1e-10,
        ]);
        let mut s = 12345u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            x.push(f32::from_bits(s));
        }
        let n = x.len();
        let xt = Tensor::from_vec(x.clone(), n, &Device::Cpu).expect("x");
        let hs = Tensor::zeros(n, DType::F16, &Device::Cpu).expect("h");
        let back = Tensor::zeros(n, DType::F32, &Device::Cpu).expect("back");
        let sum = Tensor::zeros(n, DType::F16, &Device::Cpu).expect("sum");
        let prod = Tensor::zeros(n, DType::F16, &Device::Cpu).expect("prod");
        Launch::new("test", "simtest", "wick_simtest_half", (64, 1, 1), 256)
            .output(&hs, "h")
            .output(&back, "back")
            .output(&sum, "sum")
            .output(&prod, "prod")
            .input(&xt, "x")
            .i32(n as i32)
            .run()
            .expect("launch");
        let hv: Vec<f16> = hs.to_vec1().expect("h");
        let bv: Vec<f32> = back.to_vec1().expect("back");
        let sv: Vec<f16> = sum.to_vec1().expect("sum");
        let pv: Vec<f16> = prod.to_vec1().expect("prod");
        // The `half` crate rounds to nearest even; NaN is canonical (0x7fff) on the GPU.
        let want = |v: f32| {
            if v.is_nan() {
                0x7fff
            } else {
                f16::from_f32(v).to_bits()
            }
        };
        for i in 0..n {
            assert_eq!(
                hv[i].to_bits(),
                want(x[i]),
                "fp16({:e}) ({:#x})",
                x[i],
                x[i].to_bits()
            );
            let exact = f16::from_bits(hv[i].to_bits()).to_f32();
            assert!(bv[i] == exact || bv[i].is_nan() && exact.is_nan());
            if i + 1 < n {
                let (a, b) = (
                    f16::from_f32(x[i]).to_f64(),
                    f16::from_f32(x[i + 1]).to_f64(),
                );
                // fp16 sums and products of fp16 values are exact in f64: one rounding.
                let rs = f16::from_f64(a + b);
                let rp = f16::from_f64(a * b);
                let same = |g: f16, w: f16| g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan();
                assert!(same(sv[i], rs), "{a} + {b}: {} vs {}", sv[i], rs);
                assert!(same(pv[i], rp), "{a} * {b}: {} vs {}", pv[i], rp);
            }
        }
    }

    #[test]
    fn atomics_count_every_thread_of_every_block() {
        let c = zeros_i32(3);
        Launch::new("test", "simtest", "wick_simtest_atomics", (7, 1, 1), 96)
            .output(&c, "counters")
            .run()
            .expect("launch");
        let n = 7 * 96u32;
        assert_eq!(
            c.to_vec1::<u32>().expect("read"),
            [n, n - 1, n * (n - 1) / 2]
        );
    }

    #[test]
    fn a_divergent_barrier_is_an_error() {
        let out = Tensor::zeros(64, DType::F32, &Device::Cpu).expect("out");
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_divergent_barrier",
                (1, 1, 1),
                64,
            )
            .output(&out, "out")
            .run(),
        );
        assert!(e.contains("divergent __syncthreads()"), "{e}");
        assert!(
            e.contains("threads 0-31 wait at __syncthreads (selftest.cu:"),
            "{e}"
        );
    }

    #[test]
    fn a_race_between_threads_is_an_error() {
        set_race_check(true);
        let out = Tensor::zeros(512, DType::F32, &Device::Cpu).expect("out");
        let inp = Tensor::arange(0f32, 512., &Device::Cpu).expect("in");
        let e = err_of(
            Launch::new("test", "simtest", "wick_simtest_race", (2, 1, 1), 256)
                .output(&out, "out")
                .input(&inp, "in")
                .run(),
        );
        assert!(e.contains("depends on the order the threads run in"), "{e}");
    }

    #[test]
    fn reading_past_an_argument_names_it() {
        let out = Tensor::zeros(32, DType::F32, &Device::Cpu).expect("out");
        let inp = Tensor::zeros(1000, DType::F32, &Device::Cpu).expect("in");
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_read_past_end",
                (1, 1, 1),
                32,
            )
            .output(&out, "out")
            .input(&inp, "weights")
            .i32(1000)
            .run(),
        );
        assert!(e.contains("invalid memory access"), "{e}");
        assert!(e.contains("past the end of argument 1, weights"), "{e}");
    }

    #[test]
    fn a_misaligned_vector_load_traps() {
        let out = Tensor::zeros(32, DType::F32, &Device::Cpu).expect("out");
        let inp = Tensor::zeros(64, DType::F16, &Device::Cpu).expect("in");
        let e = err_of(
            Launch::new("test", "simtest", "wick_simtest_misaligned", (1, 1, 1), 32)
                .output(&out, "out")
                .input(&inp, "in")
                .run(),
        );
        assert!(e.contains("UB check trapped"), "{e}");
    }

    #[test]
    fn indexing_past_a_shared_array_traps() {
        let out = Tensor::zeros(64, DType::F32, &Device::Cpu).expect("out");
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_shared_overflow",
                (1, 1, 1),
                64,
            )
            .output(&out, "out")
            .run(),
        );
        assert!(e.contains("UB check trapped"), "{e}");
        assert!(e.contains("thread (32,0,0)"), "{e}");
    }

    #[test]
    fn a_shuffle_naming_exited_lanes_is_an_error() {
        let out = Tensor::zeros(32, DType::F32, &Device::Cpu).expect("out");
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_exited_lanes",
                (1, 1, 1),
                32,
            )
            .output(&out, "out")
            .run(),
        );
        assert!(
            e.contains("exited while lanes of its warp wait") || e.contains("already exited"),
            "{e}"
        );
    }

    #[test]
    fn writing_an_input_is_an_error() {
        let inp = Tensor::ones(32, DType::F32, &Device::Cpu).expect("in");
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_writes_input",
                (1, 1, 1),
                32,
            )
            .input(&inp, "in")
            .run(),
        );
        assert!(e.contains("an input was modified"), "{e}");
        assert_eq!(inp.to_vec1::<f32>().expect("read"), vec![1f32; 32]);
    }

    #[test]
    fn launches_are_checked_against_the_kernel_signature() {
        let out = Tensor::zeros(64, DType::F32, &Device::Cpu).expect("out");
        let inp = Tensor::zeros(64, DType::F16, &Device::Cpu).expect("in");
        // An fp16 tensor where the kernel takes floats.
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_read_past_end",
                (1, 1, 1),
                32,
            )
            .output(&out, "out")
            .input(&inp, "in")
            .i32(0)
            .run(),
        );
        assert!(e.contains("elements of another size"), "{e}");
        // An i64 where the kernel takes an int; a missing argument; a written const.
        let e = err_of(
            Launch::new("test", "simtest", "wick_simtest_warp_ops", (1, 1, 1), 32)
                .output(&out, "out")
                .i64(0)
                .run(),
        );
        assert!(e.contains("wrong size"), "{e}");
        let e = err_of(
            Launch::new("test", "simtest", "wick_simtest_warp_ops", (1, 1, 1), 32)
                .output(&out, "out")
                .run(),
        );
        assert!(e.contains("takes 2 parameters"), "{e}");
        let f = Tensor::zeros(64, DType::F32, &Device::Cpu).expect("f");
        let e = err_of(
            Launch::new(
                "test",
                "simtest",
                "wick_simtest_read_past_end",
                (1, 1, 1),
                32,
            )
            .output(&out, "out")
            .output(&f, "in")
            .i32(0)
            .run(),
        );
        assert!(e.contains("const in the kernel"), "{e}");
        // More threads than a block may have.
        let e = err_of(
            Launch::new("test", "simtest", "wick_simtest_atomics", (1, 1, 1), 2048)
                .output(&out, "out")
                .run(),
        );
        assert!(e.contains("invalid launch configuration"), "{e}");
    }
}
