// Host-side CUDA services shared by the backend and the Python bindings: device discovery and
// raw device buffers. Declared without CUDA headers, and compiled from cuda/runtime.cu or, in
// builds without CUDA, from cuda/unavailable.cpp, so callers need no #ifdef.
#pragma once

#include <cstddef>

namespace batchnorm::cuda {

// Number of usable CUDA devices: 0 when the build has no CUDA, no driver is installed, the
// driver is too old or no GPU is present. Never throws.
int device_count();

// Whether this build carries the CUDA backend (whatever the machine has).
bool built();

// Device memory on `device` (for the Python layer's weights and for outputs of frameworks that
// cannot allocate them, such as JAX). `release` finds the owning device itself.
void* allocate(std::size_t bytes, int device);
void release(void* data) noexcept;

// Copies between any two of host and device memory and returns once the data has arrived.
// Waits for all queued work on the device first: weights move rarely, and this keeps the copy
// ordered after kernels queued on any framework's stream.
void copy(void* destination, const void* source, std::size_t bytes);

// Waits for all work queued on `device`.
void synchronize(int device);

}  // namespace batchnorm::cuda
