//! One kernel launch, described once and run on either backend: the GPU (cudarc) with
//! `--features cuda`, the CPU execution layer without. The wrappers in ops.rs build a
//! [`Launch`] after validating shapes and indices; the CPU layer checks its arguments
//! against the compiled kernel's C++ signature, so the GPU path runs argument lists that
//! `cargo test` has checked.

use candle_core::{Device, Tensor};

use super::{KernelError, Result};

/// A kernel argument. Tensors are passed as a pointer to their first element; whether the
/// kernel reads or writes them is part of the description (the CPU layer enforces it against
/// the kernel's `const` qualifiers).
pub(crate) enum Arg<'a> {
    /// Read only.
    In(&'a Tensor, &'static str),
    /// Written by the kernel (in place, or a fresh output). Only tensors the caller owns.
    Out(&'a Tensor, &'static str),
    /// A null pointer (an optional input left out), with its name for the CPU layer's
    /// messages (the GPU launch has no use for it).
    Null(#[cfg_attr(feature = "cuda", allow(dead_code))] &'static str),
    I32(i32),
    I64(i64),
    F32(f32),
}

pub(crate) struct Launch<'a> {
    /// The public operation, for messages.
    pub op: &'static str,
    /// The kernels/*.cu file (its stem).
    pub module: &'static str,
    pub kernel: String,
    pub grid: (u32, u32, u32),
    /// Threads per block (x only: every kernel is one-dimensional within a block).
    pub block: u32,
    pub args: Vec<Arg<'a>>,
}

impl<'a> Launch<'a> {
    pub fn new(
        op: &'static str,
        module: &'static str,
        kernel: impl Into<String>,
        grid: (u32, u32, u32),
        block: u32,
    ) -> Self {
        Self {
            op,
            module,
            kernel: kernel.into(),
            grid,
            block,
            args: Vec::new(),
        }
    }

    pub fn input(mut self, t: &'a Tensor, what: &'static str) -> Self {
        self.args.push(Arg::In(t, what));
        self
    }

    pub fn output(mut self, t: &'a Tensor, what: &'static str) -> Self {
        self.args.push(Arg::Out(t, what));
        self
    }

    pub fn input_opt(mut self, t: Option<&'a Tensor>, what: &'static str) -> Self {
        self.args.push(match t {
            Some(t) => Arg::In(t, what),
            None => Arg::Null(what),
        });
        self
    }

    pub fn output_opt(mut self, t: Option<&'a Tensor>, what: &'static str) -> Self {
        self.args.push(match t {
            Some(t) => Arg::Out(t, what),
            None => Arg::Null(what),
        });
        self
    }

    pub fn i32(mut self, v: i32) -> Self {
        self.args.push(Arg::I32(v));
        self
    }

    pub fn i64(mut self, v: i64) -> Self {
        self.args.push(Arg::I64(v));
        self
    }

    pub fn f32(mut self, v: f32) -> Self {
        self.args.push(Arg::F32(v));
        self
    }

    /// The device every tensor argument lives on (they must agree).
    fn device(&self) -> Result<&'a Device> {
        let mut dev: Option<&'a Device> = None;
        for a in &self.args {
            if let Arg::In(t, what) | Arg::Out(t, what) = *a {
                match dev {
                    None => dev = Some(t.device()),
                    Some(d) if d.same_device(t.device()) => {}
                    Some(d) => {
                        return Err(KernelError::Shape {
                            op: self.op,
                            msg: format!(
                                "{what} is on {:?}, other arguments on {:?}",
                                t.device().location(),
                                d.location()
                            ),
                        })
                    }
                }
            }
        }
        dev.ok_or_else(|| KernelError::Shape {
            op: self.op,
            msg: "a launch without tensors".into(),
        })
    }

    /// Queues (GPU) or runs (CPU layer) the kernel.
    pub fn run(self) -> Result<()> {
        let dev = self.device()?;
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => super::driver::launch(d, &self),
            #[cfg(not(feature = "cuda"))]
            Device::Cpu => super::sim::launch(&self),
            other => Err(KernelError::Device {
                op: self.op,
                what: "the arguments",
                device: other.location(),
                why: super::unsupported_why(),
            }),
        }
    }
}
