//! Prompt-sized matmuls on Intel AMX (Sapphire Rapids and later): one `tdpbssd` multiplies
//! 16 activation rows by 16 weight rows over a 32-value block, where the VNNI tile kernel
//! needs 32 instructions for a quarter of that. Weights keep the packed layout of
//! [`super::pack`]; each pair of 8-row groups is expanded to signed bytes once per matmul and
//! then reused for every 16 activation rows, so the expansion is paid once, not per row
//! (with one tile of rows, each block just before it is multiplied).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::x86::{head_bytes, k_scales, nibble_chunk, Q4K, Q4_1, Q5_0, Q6K, Q8_0};
use super::{block_at, Act, QK};

/// Activation rows per tile: callers pad the activations to a multiple of this.
pub const ROWS: usize = 16;
/// Weight rows per tile: two packed groups.
pub const COLS: usize = 16;

/// Whether this CPU and OS let us use AMX-INT8 (with AVX-512 for the float epilogue).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw") && has!("avx2") && has!("fma") && has!("f16c")) {
            return false;
        }
        // CPUID.(7,0):EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let edx = __cpuid_count(7, 0).edx;
        if edx & (3 << 24) != 3 << 24 {
            return false;
        }
        // Linux hands out the 8 KiB tile state only on request (a seccomp profile may refuse).
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    })
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile shapes on this thread: tmm0-3 results (16 x 16 i32), tmm4-5 activations
/// (16 rows x 32 bytes), tmm6-7 weights (8 rows x 64 bytes). candle 0.11's AMX Q4_K kernel
/// runs on the same threads, loads its configuration once per thread and uses these same
/// registers with these same shapes, so either configuration serves both.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx512f")]
unsafe fn configure() {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..4 {
            (cfg.colsb[t], cfg.rows[t]) = (64, 16);
        }
        for t in 4..6 {
            (cfg.colsb[t], cfg.rows[t]) = (32, 16);
        }
        for t in 6..8 {
            (cfg.colsb[t], cfg.rows[t]) = (64, 8);
        }
        std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
    }
}

/// One 32-value block of 16 weight rows, expanded: `q` in the layout `tdpbssd` wants for its
/// second operand (row `r` of 8 holds values 4r..4r+4 of each weight row in turn), as signed
/// bytes; `d` the rows' scales and `m` their offsets (Q4_1's and Q4_K's minimum). Q6_K has
/// a second scale for values 16..32: `q` then holds values 0..16 (rows 4..8 zero), `q2`
/// values 16..32 (rows 0..4 zero) and `m` their scale.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Expanded {
    q: [u8; 8 * 64],
    q2: [u8; 8 * 64],
    d: [f32; COLS],
    m: [f32; COLS],
}

impl Default for Expanded {
    fn default() -> Self {
        Self {
            q: [0; 8 * 64],
            q2: [0; 8 * 64],
            d: [0.0; COLS],
            m: [0.0; COLS],
        }
    }
}

/// Expands one block of two packed groups: `g[0]` and `g[1]` point at it, `heads` at the
/// heads of their superblocks (k-quants only).
///
/// # Safety
/// `g` must point at a whole packed block of type `KIND` in each group, `heads` (k-quants) at
/// its superblock's head, and the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn expand<const KIND: u8>(g: [*const u8; 2], heads: [*const u8; 2], e: &mut Expanded) {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe {
        for (half, (sb, head)) in g.into_iter().zip(heads).enumerate() {
            let (d, m) = if KIND == Q4K || KIND == Q6K {
                k_scales::<KIND>(sb, head)
            } else {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sb as *const __m128i));
                let m = if KIND == Q4_1 {
                    _mm256_cvtph_ps(_mm_loadu_si128(sb.add(16) as *const __m128i))
                } else {
                    _mm256_setzero_ps()
                };
                (d, m)
            };
            _mm256_storeu_ps(e.d.as_mut_ptr().add(8 * half), d);
            _mm256_storeu_ps(e.m.as_mut_ptr().add(8 * half), m);
            let base = e.q.as_mut_ptr().add(32 * half);
            let row = |r: usize| base.add(64 * r) as *mut __m256i;
            if KIND == Q6K {
                // Values 0..64 stored unsigned, offset 32: subtract it to make them signed.
                // Values 0..16 go to q (rows 4..8 zero), 16..32 to q2 (rows 0..4 zero).
                let base2 = e.q2.as_mut_ptr().add(32 * half);
                let row2 = |r: usize| base2.add(64 * r) as *mut __m256i;
                let (off, zero) = (_mm256_set1_epi8(32), _mm256_setzero_si256());
                for c in 0..4 {
                    let (lo, hi) = nibble_chunk::<KIND>(sb, c);
                    _mm256_storeu_si256(row(c), _mm256_sub_epi8(lo, off));
                    _mm256_storeu_si256(row(4 + c), zero);
                    _mm256_storeu_si256(row2(c), zero);
                    _mm256_storeu_si256(row2(4 + c), _mm256_sub_epi8(hi, off));
                }
                continue;
            }
            if KIND == Q8_0 {
                // Stored as q + 128 (see `pack`): flip the sign bit back.
                let flip = _mm256_set1_epi8(-128);
                for c in 0..8 {
                    let q = _mm256_loadu_si256(sb.add(16 + 32 * c) as *const __m256i);
                    _mm256_storeu_si256(row(c), _mm256_xor_si256(q, flip));
                }
                continue;
            }
            for c in 0..4 {
                let (mut lo, mut hi) = nibble_chunk::<KIND>(sb, c);
                if KIND == Q5_0 {
                    // 5-bit values are offset by 16: subtracting it here makes them signed,
                    // so the dot product needs no correction term.
                    let sixteen = _mm256_set1_epi8(16);
                    lo = _mm256_sub_epi8(lo, sixteen);
                    hi = _mm256_sub_epi8(hi, sixteen);
                }
                _mm256_storeu_si256(row(c), lo);
                _mm256_storeu_si256(row(4 + c), hi);
            }
        }
    }
}

/// One AMX work item: `m` activation rows (`nb` blocks each at `acts`, padded with zero
/// blocks to a multiple of [`ROWS`] rows) times the 16 weight rows of packed groups `g0` and
/// `g1`, into 16 outputs of each activation row, `out_stride` apart.
#[derive(Clone, Copy)]
pub struct Pair {
    pub g0: *const u8,
    pub g1: *const u8,
    pub nb: usize,
    pub acts: *const Act,
    pub m: usize,
    pub out: *mut f32,
    pub out_stride: usize,
}

/// Multiplies a [`Pair`]; `scratch` holds its expanded weights.
///
/// Software-pipelined: block b + 1's tile loads, multiply and store are issued before block
/// b's float epilogue, into the other result tiles and sums, so the multiply's latency and
/// the store-to-load round trip through memory overlap the previous block's epilogue (with
/// one set of tiles, every block waited for its own). The epilogue adds the blocks in order,
/// so the results are unchanged.
///
/// # Safety
/// [`available`] must be true and this thread's tiles configured ([`session`]); `g0`/`g1`
/// must each point at a packed group of `nb` blocks per row; `acts` must hold
/// `m.next_multiple_of(ROWS) * nb` blocks; `out` room for `(m - 1) * out_stride + 16`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn tile_pair<const KIND: u8, const BB: usize>(p: &Pair, scratch: &mut Vec<Expanded>) {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe {
        let Pair {
            g0,
            g1,
            nb,
            acts,
            m,
            out,
            out_stride,
        } = *p;
        // One tile of rows uses each expanded block once: expand two blocks ahead of the
        // multiply into a ring of three, which stays in L1 and keeps the vector units
        // expanding while the tile unit multiplies. More rows reuse every block per tile,
        // so expand them all first.
        let ring = m <= ROWS;
        let slots = if ring { nb.min(3) } else { nb };
        if scratch.len() < slots {
            scratch.resize(slots, Expanded::default());
        }
        let at = |b: usize| if ring { b % 3 } else { b };
        let slot = scratch.as_mut_ptr();
        let expand_block = |b: usize| {
            // Where block b starts in each group, and its superblock's head (k-quants).
            let (off, head_off) = block_at(BB, head_bytes(KIND), b);
            let g = [g0.add(off), g1.add(off)];
            expand::<KIND>(
                g,
                [g0.add(head_off), g1.add(head_off)],
                &mut *slot.add(at(b)),
            );
        };
        for b in 0..if ring { nb.min(2) } else { nb } {
            expand_block(b);
        }
        let a_stride = nb * std::mem::size_of::<Act>();
        let q_offset = std::mem::offset_of!(Act, q);
        #[repr(C, align(64))]
        struct Sums([i32; ROWS * COLS]);
        // Per block parity: the sums of q (and of Q6_K's q2).
        let mut sums = [
            [Sums([0; ROWS * COLS]), Sums([0; ROWS * COLS])],
            [Sums([0; ROWS * COLS]), Sums([0; ROWS * COLS])],
        ];
        for m0 in (0..m).step_by(ROWS) {
            let mut acc = [_mm512_setzero_ps(); ROWS];
            let row0 = acts.add(m0 * nb);
            // Block b's multiply into tmm0 (tmm1 for q2) when b is even, tmm2 (tmm3) when
            // odd, stored to sums[b % 2].
            let issue = |b: usize, sums: &mut [[Sums; 2]; 2]| {
                let (e, [s, s2]) = (&*slot.add(at(b)), &mut sums[b % 2]);
                let a = (row0.add(b) as *const u8).add(q_offset);
                // Register names are literal in `asm!`: one body, the tiles as arguments.
                macro_rules! multiply {
                    ($a:literal, $c:literal, $c2:literal) => {
                        std::arch::asm!(
                            concat!("tileloadd ", $a, ", [{a} + {a_stride}*1]"),
                            "tileloadd tmm6, [{w} + {w_stride}*1]",
                            concat!("tilezero ", $c),
                            concat!("tdpbssd ", $c, ", ", $a, ", tmm6"),
                            concat!("tilestored [{c} + {c_stride}*1], ", $c),
                            a = in(reg) a,
                            a_stride = in(reg) a_stride,
                            w = in(reg) e.q.as_ptr(),
                            w_stride = in(reg) 64usize,
                            c = in(reg) s.0.as_mut_ptr(),
                            c_stride = in(reg) 64usize,
                            options(nostack)
                        );
                        if KIND == Q6K {
                            std::arch::asm!(
                                "tileloadd tmm7, [{w} + {w_stride}*1]",
                                concat!("tilezero ", $c2),
                                concat!("tdpbssd ", $c2, ", ", $a, ", tmm7"),
                                concat!("tilestored [{c} + {c_stride}*1], ", $c2),
                                w = in(reg) e.q2.as_ptr(),
                                w_stride = in(reg) 64usize,
                                c = in(reg) s2.0.as_mut_ptr(),
                                c_stride = in(reg) 64usize,
                                options(nostack)
                            );
                        }
                    };
                }
                if b.is_multiple_of(2) {
                    multiply!("tmm4", "tmm0", "tmm1");
                } else {
                    multiply!("tmm5", "tmm2", "tmm3");
                }
            };
            if nb > 0 {
                issue(0, &mut sums);
            }
            for b in 0..nb {
                if ring && b + 2 < nb {
                    expand_block(b + 2);
                }
                let e = &*slot.add(at(b));
                if b + 1 < nb {
                    issue(b + 1, &mut sums);
                }
                let [s, s2] = &sums[b % 2];
                let d = _mm512_load_ps(e.d.as_ptr());
                let mins = _mm512_load_ps(e.m.as_ptr());
                for (i, acc) in acc.iter_mut().enumerate() {
                    let act = &*row0.add(i * nb + b);
                    let s = _mm512_cvtepi32_ps(_mm512_load_si512(s.0.as_ptr().add(COLS * i) as _));
                    // x = d * q (+ m): sum(x * a) = d * da * sum(q * qa) (+ m * s), with the
                    // VNNI tile kernel's operations in its order (results independent of m).
                    let t = _mm512_mul_ps(s, _mm512_set1_ps(act.d));
                    *acc = _mm512_fmadd_ps(t, d, *acc);
                    if KIND == Q4_1 || KIND == Q4K {
                        *acc = _mm512_fmadd_ps(mins, _mm512_set1_ps(act.s), *acc);
                    }
                    if KIND == Q6K {
                        let s2 = s2.0.as_ptr().add(COLS * i);
                        let t = _mm512_mul_ps(
                            _mm512_cvtepi32_ps(_mm512_load_si512(s2 as _)),
                            _mm512_set1_ps(act.d),
                        );
                        *acc = _mm512_fmadd_ps(t, mins, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(m - m0) {
                _mm512_storeu_ps(out.add((m0 + i) * out_stride), *acc);
            }
        }
    }
}

thread_local! {
    /// Each pool thread's expanded weights, kept from matmul to matmul: allocated per
    /// call, the buffer (175 KB for a 4864-wide input) cost page faults and zeroing each time.
    static SCRATCH: std::cell::RefCell<Vec<Expanded>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's tiles configured once and its scratch for [`run`]: one
/// `ldtilecfg` per job on a thread, not one per pair.
///
/// # Safety
/// [`available`] must be true.
pub unsafe fn session<R>(f: impl FnOnce(&mut Vec<Expanded>) -> R) -> R {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe { configure() };
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        // Only a nested session on the same thread finds it lent: give that one its own.
        Err(_) => f(&mut Vec::new()),
    })
}

/// [`tile_pair`] for `kind`.
///
/// # Safety
/// As for [`tile_pair`]: inside a [`session`] on this thread.
pub unsafe fn run(kind: super::Kind, p: &Pair, scratch: &mut Vec<Expanded>) {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe {
        const { assert!(QK == 32) };
        match kind {
            super::Kind::Q4_1 => tile_pair::<Q4_1, 20>(p, scratch),
            super::Kind::Q5_0 => tile_pair::<Q5_0, 22>(p, scratch),
            super::Kind::Q8_0 => tile_pair::<Q8_0, 34>(p, scratch),
            super::Kind::Q4K => tile_pair::<Q4K, 18>(p, scratch),
            super::Kind::Q6K => tile_pair::<Q6K, 26>(p, scratch),
        }
    }
}
