// The CUDA backend's device code (kernels, launchers, operations) as host C++: the emulation in
// include/cuda_runtime.h stands in for the CUDA toolkit.
#include "cuda/backend.cu"
