// The CUDA backend's runtime services as host C++, on the emulated CUDA runtime.
#include "cuda/runtime.cu"
