// Portability macros shared by the CPU and CUDA backends.
#pragma once

#if defined(__CUDACC__)
#define BATCHNORM_HD __host__ __device__
#else
#define BATCHNORM_HD
#endif
