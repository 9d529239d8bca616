// Host-side pieces of the CUDA backend shared by its runtime services (cuda/runtime.cu), the
// launchers (cuda/launchers.cuh) and the kernels: error checks, the device and stream of a call,
// scratch memory, and the work decomposition (Geometry) of a Plan.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "core/config.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"

namespace batchnorm::cuda {

using detail::Coefficients;
using detail::Moments;
using detail::Plan;

// Throws std::runtime_error naming `what` and the CUDA error unless `status` is cudaSuccess.
void check(cudaError_t status, const char* what);

// Makes the device that owns `pointer` (or `device`) current for the scope, restoring the
// previous one; rejects pointers that are not device memory with an error naming `what`.
class DeviceScope {
 public:
  DeviceScope(const void* pointer, const char* what);
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

  int device() const { return device_; }

 private:
  void enter();
  int device_ = 0;
  int previous_ = 0;
};

// An array a call hands to CUDA: `used` is false where nothing of it is read or written (an
// empty tensor, an absent optional vector), and then its pointer may be anything.
struct Operand {
  const void* data;
  bool used;
  const char* name;
};

// Throws std::invalid_argument naming the first used operand that is not memory of `device`
// (or managed memory): a host pointer tagged as CUDA from C++ would otherwise fault in a kernel
// and leave the CUDA context unusable.
void check_operands(int device, std::initializer_list<Operand> operands);

// Throws if an error of earlier CUDA work of this thread is pending, before a call queues its
// own, so that the error is not reported as the call's.
void check_earlier_errors();

// Checks a kernel launch on `stream`, naming `what` in the error; debug builds also wait for
// the kernel, so that an asynchronous fault is reported by the kernel that caused it.
void launched(const char* what, cudaStream_t stream);

// The stream set by batchnorm::set_cuda_stream for the calling thread.
cudaStream_t current_stream();

// batchnorm's own stream-ordered memory pool on the current device, for per-call scratch
// memory. Unlike the device's default pool (which returns memory to the driver at every
// synchronization) it keeps what it has grown to, so repeated calls do not map memory again.
cudaMemPool_t scratch_pool();

// A non-blocking stream of batchnorm's own on the current device, for releasing memory in
// stream order outside any call; false where it cannot be made.
bool release_stream(cudaStream_t* stream) noexcept;

inline constexpr int kThreads = 256;
// Bytes a thread takes at a time where shape and strides allow: 16 (float32 x 4, float64 x 2),
// but 8 for 16-bit data (4 elements), so that every element type keeps 4 lanes (and their
// float64 sums) per thread and the wide kernels fit the register budget of kMinBlocks.
inline constexpr int vector_bytes(std::size_t element_bytes) { return element_bytes == 2 ? 8 : 16; }
inline constexpr int vector_width(std::size_t element_bytes) {
  return vector_bytes(element_bytes) / static_cast<int>(element_bytes);
}
// Resident 256-thread blocks per SM the streaming kernels are compiled for: 3 (37.5% occupancy
// on sm_80/sm_90, at most 80 registers per thread), 2 for float64 data, whose sums and
// coefficients take twice the registers.
template <class T>
inline constexpr int kMinBlocks = sizeof(T) == 8 ? 2 : 3;
// Elements one block reduces per statistic chunk: enough per thread (128) to amortize the
// block merge, small enough that a (32, 64, 112, 112) tensor gives over a thousand blocks.
inline constexpr std::int64_t kChunkElements = 32768;

// How a Plan is cut into blocks. Depends only on the shape and strides of the operands, never
// on their alignment or the GPU, so the reduction order (and every result bit) is the same on
// any device and at any offset of the data.
//
// Row mode: per outer stat item a (rows x inner) matrix with contiguous features. A block is
// a tile of tile_x vectors of `vector` features times tile_y threads over rows, and reduces
// `per_chunk` rows. Plane mode: per statistic `units` runs of `run` elements; a block reduces
// `per_chunk` consecutive elements of one statistic.
struct Geometry {
  bool row = false;
  int vector = 1;              // elements a thread takes at a time: vector_width(sizeof(T))
                               // where shape and strides allow, else 1
  bool aligned = false;        // every operand (but a mask) on vector_bytes: one load per group
  bool flat = true;            // the walk's index is one dim (no division per load); vectors
                               // need a flat walk
  std::int64_t stats = 0;      // statistics (g * C + c)
  std::int64_t inner = 1;      // row mode: features per row
  std::int64_t rows = 0;       // row mode: rows per outer item
  std::int64_t columns = 0;    // row mode: vectors per row (inner / vector)
  int tile_x = 1;              // row mode: threads across columns (blockDim.x)
  int tile_y = 1;              // row mode: threads across rows (blockDim.y)
  std::int64_t tiles = 0;      // row mode: column tiles per row
  std::int64_t run = 1;        // plane mode: elements per run (innermost reduced dim)
  std::int64_t units = 0;      // plane mode: runs per statistic
  int unit_dims = 0;           // plane mode: reduced dims that enumerate the runs
  std::int64_t per_chunk = 1;  // rows (row mode) or elements (plane mode) per block
  std::int64_t chunks = 0;     // chunks per statistic
  std::int64_t blocks = 0;     // grid size

  BATCHNORM_HD std::int64_t outer() const { return row ? stats / inner : stats; }
};

// Partial sums of the backward pass per (statistic, chunk).
struct Sums {
  double dy;
  double dy_centered;
};

}  // namespace batchnorm::cuda
