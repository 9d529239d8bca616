// Host-side CUDA services shared by the backend and the Python bindings: device discovery and
// raw device buffers. Declared without CUDA headers, and compiled from cuda/runtime.cu or, in
// builds without CUDA, from cuda/unavailable.cpp, so callers need no #ifdef.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "batchnorm/batchnorm.hpp"

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

// Device memory for a call's own vectors (the gamma a training forward keeps for its backward,
// the adjustment), allocated in the calling thread's stream order on `device` without waiting
// on the host. `used` records that work queued now on the calling thread's stream reads or
// writes it; `release_after_use` frees it in stream order once all that work is done, again
// without a host wait (cudaFree would wait for the whole device on every training step).
void* allocate_on_stream(std::size_t bytes, int device);
void used(void* data);
void release_after_use(void* data) noexcept;

// Copies between any two of host and device memory and returns once the data has arrived, for
// copies outside the layer's calls (weights set, read or moved): waits for all work queued on
// the device first, since kernels of earlier calls on any stream may still read or write these
// vectors, then for the copy itself (a copy from pageable host memory may otherwise return
// before its data reach the device, unordered with kernels on a non-blocking stream).
void copy(void* destination, const void* source, std::size_t bytes);

// Queues a copy on the calling thread's stream (batchnorm::set_cuda_stream), for copies inside
// a call: ordered after the work queued there before it and before the kernels queued after
// it, without a wait on the host between device buffers (so a CUDA graph can capture it). A
// host source may be reused once it returns.
void copy_on_stream(void* destination, const void* source, std::size_t bytes);

// Makes the calling thread's stream wait, on the device, for the work queued so far on
// `producer` (a cudaStream_t of `device`): orders an operand that another framework made on its
// own stream before the kernels. Does not block the host.
void wait_for_stream(void* producer, int device);

// Waits for all work queued on `device`.
void synchronize(int device);

// The statistics of a CUDA training forward that kept them in caller-owned device memory
// (TrainingContext::device_storage, the packed layout), for a backward whose context is rebuilt
// from that memory (the torch.compile route hands it from its forward op to its backward op as
// a tensor). The caller's stream orders the backward after the forward: nothing is waited for.
std::shared_ptr<const DeviceStatistics> statistics_in(double* storage, std::int64_t groups,
                                                      std::int64_t features);

}  // namespace batchnorm::cuda
