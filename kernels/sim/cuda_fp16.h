// Stands in for CUDA's <cuda_fp16.h> when the system C++ compiler builds kernels/*.cu for
// the CPU execution layer: build.rs puts kernels/sim first on the include path.
#pragma once
#include "cuda_sim.h"
