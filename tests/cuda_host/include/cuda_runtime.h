// Host emulation of the part of CUDA that batchnorm's CUDA backend uses, so that the real
// kernels, launchers and backend (cpp/src/cuda) compile with the host C++ compiler and run in a
// test without a GPU. It stands in for the toolkit's <cuda_runtime.h> (this folder is searched
// first).
//
// A launch runs its grid at once, one block after another on the calling thread. The threads of
// a block are fibers (ucontext) that the block's scheduler switches at every __syncthreads and
// warp shuffle: a barrier releases its threads only once all of them (all live threads of the
// block, or of the warp) have reached it, so the kernels see the memory ordering CUDA promises
// and no more. A thread that reads shared memory before another one wrote it (a missing
// __syncthreads) reads the previous phase's or block's values, and threads that wait at
// different barriers are reported as a deadlock. Device memory is host memory filled with NaN
// bytes and registered as device memory (cudaPointerGetAttributes tells it from host memory).
// Streams and events are ordering tokens only: every operation is done when its call returns.
//
// Stream capture (cudaStreamBeginCapture ... cudaStreamEndCapture) runs the captured work at once
// too, and checks what a CUDA graph of it would need to be legal and replayable: while a capture
// is active, a host wait (device, stream or event synchronization), a synchronous or host-side
// copy, cudaMalloc/cudaFree, a stream-ordered free of memory the capture did not allocate, and a
// wait across the capture's boundary (the captured stream on an event recorded outside it, or
// another stream on one recorded inside) fail with cudaErrorStreamCaptureUnsupported; so does
// ending a capture whose stream-ordered allocations are not all freed in it. Each such call is
// also listed in cuda_host::capture_violations().
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- qualifiers ---------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time on a thread (ranks of a communicator run on threads of their own).
#define __shared__ static thread_local

// ---- types and errors ---------------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900,
};

// A stream is a token; an event remembers the capture that last recorded it (0: none).
struct CUstream_st {};
struct CUevent_st {
  long capture = 0;
};
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
using cudaGraph_t = struct CUgraph_st*;
using cudaMemPool_t = struct CUmemPool_st*;
#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))

enum cudaMemcpyKind {
  cudaMemcpyHostToHost,
  cudaMemcpyHostToDevice,
  cudaMemcpyDeviceToHost,
  cudaMemcpyDeviceToDevice,
  cudaMemcpyDefault
};
enum cudaMemoryType {
  cudaMemoryTypeUnregistered,
  cudaMemoryTypeHost,
  cudaMemoryTypeDevice,
  cudaMemoryTypeManaged
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
enum cudaMemAllocationType { cudaMemAllocationTypePinned = 1 };
enum cudaMemLocationType { cudaMemLocationTypeDevice = 1 };
struct cudaMemLocation {
  cudaMemLocationType type;
  int id;
};
struct cudaMemPoolProps {
  cudaMemAllocationType allocType;
  cudaMemLocation location;
};
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
inline constexpr unsigned cudaEventDisableTiming = 2;
inline constexpr unsigned cudaStreamNonBlocking = 1;

namespace cuda_host {

// ---- device memory ------------------------------------------------------------------------------

struct Memory {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> blocks;  // start -> bytes
  cudaError_t last_error = cudaSuccess;
};

inline Memory& memory() {
  static Memory m;
  return m;
}

// The device block holding `pointer`, or null.
inline const std::pair<const std::uintptr_t, std::size_t>* block_of(const void* pointer) {
  Memory& m = memory();
  const auto at = reinterpret_cast<std::uintptr_t>(pointer);
  const std::lock_guard<std::mutex> lock(m.mutex);
  auto it = m.blocks.upper_bound(at);
  if (it == m.blocks.begin()) return nullptr;
  --it;
  return at < it->first + std::max<std::size_t>(it->second, 1) ? &*it : nullptr;
}

inline void* allocate(std::size_t bytes) {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256;
  void* data = std::aligned_alloc(256, rounded);
  if (!data) return nullptr;
  std::memset(data, 0xff, rounded);  // NaN in every floating-point type: unwritten values show
  Memory& m = memory();
  const std::lock_guard<std::mutex> lock(m.mutex);
  m.blocks[reinterpret_cast<std::uintptr_t>(data)] = bytes;
  return data;
}

inline cudaError_t release(void* data) {
  if (!data) return cudaSuccess;
  Memory& m = memory();
  {
    const std::lock_guard<std::mutex> lock(m.mutex);
    if (m.blocks.erase(reinterpret_cast<std::uintptr_t>(data)) == 0) return cudaErrorInvalidValue;
  }
  std::free(data);
  return cudaSuccess;
}

// ---- stream capture -----------------------------------------------------------------------------

struct Capture {
  std::mutex mutex;
  cudaStream_t stream = nullptr;  // the capturing stream; null when no capture is active
  long id = 0;                    // the active (or last) capture's number, from 1
  std::set<void*> allocations;    // stream-ordered allocations of the capture not freed yet
  std::vector<std::string> violations;
  bool failed = false;  // a violation in the active capture
};

inline Capture& capture() {
  static Capture c;
  return c;
}

inline bool capturing() {
  Capture& c = capture();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.stream != nullptr;
}

inline bool capturing(cudaStream_t stream) {
  Capture& c = capture();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.stream != nullptr && c.stream == stream;
}

inline cudaError_t& last_error();

// Records a call that a graph capture forbids; the call fails.
inline cudaError_t violate(const std::string& what) {
  Capture& c = capture();
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    c.violations.push_back(what);
    c.failed = true;
  }
  return last_error() = cudaErrorStreamCaptureUnsupported;
}

// The violations recorded since the last call, which clears them.
inline std::vector<std::string> capture_violations() {
  Capture& c = capture();
  const std::lock_guard<std::mutex> lock(c.mutex);
  std::vector<std::string> out;
  out.swap(c.violations);
  return out;
}

// ---- the threads of a block ---------------------------------------------------------------------

enum class State { ready, block_barrier, warp_barrier, done };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 index;
  unsigned linear = 0;
  State state = State::ready;
};

struct Launch {
  dim3 grid, block, block_index;
  unsigned threads = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::vector<std::uint64_t> exchange;  // warp shuffles: one slot per thread
};

inline Launch& launch_state() {
  static thread_local Launch state;
  return state;
}

inline Fiber& current_fiber() {
  Fiber* fiber = launch_state().current;
  if (!fiber) throw std::logic_error("cuda_host: a device built-in used outside a kernel");
  return *fiber;
}

inline void fiber_main() {
  Launch& l = launch_state();
  try {
    (*l.body)();
  } catch (...) {
    if (!l.error) l.error = std::current_exception();
  }
  l.current->state = State::done;
  // Returning resumes the scheduler (uc_link).
}

inline void wait_at(State barrier) {
  Launch& l = launch_state();
  Fiber& f = *l.current;
  f.state = barrier;
  swapcontext(&f.context, &l.scheduler);
}

// Releases the threads waiting at a barrier that all its threads have reached; false when no
// thread could be released.
inline bool release_barriers(Launch& l) {
  bool released = false;
  for (unsigned first = 0; first < l.threads; first += 32) {
    const unsigned end = std::min(first + 32, l.threads);
    bool waiting = false, all = true;
    for (unsigned t = first; t < end; ++t) {
      const State s = l.fibers[t].state;
      waiting = waiting || s == State::warp_barrier;
      all = all && (s == State::warp_barrier || s == State::done);
    }
    if (waiting && all) {
      for (unsigned t = first; t < end; ++t) {
        if (l.fibers[t].state == State::warp_barrier) l.fibers[t].state = State::ready;
      }
      released = true;
    }
  }
  if (released) return true;
  bool waiting = false, all = true;
  for (unsigned t = 0; t < l.threads; ++t) {
    const State s = l.fibers[t].state;
    waiting = waiting || s == State::block_barrier;
    all = all && (s == State::block_barrier || s == State::done);
  }
  if (waiting && all) {
    for (unsigned t = 0; t < l.threads; ++t) {
      if (l.fibers[t].state == State::block_barrier) l.fibers[t].state = State::ready;
    }
    return true;
  }
  return false;
}

inline void run_block(Launch& l) {
  constexpr std::size_t kStack = 256 * 1024;
  for (unsigned t = 0; t < l.threads; ++t) {
    Fiber& f = l.fibers[t];
    if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
    f.linear = t;
    f.index = dim3(t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y));
    f.state = State::ready;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &l.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (;;) {
    bool ran = false, finished = true;
    for (unsigned t = 0; t < l.threads; ++t) {
      Fiber& f = l.fibers[t];
      if (f.state == State::ready) {
        l.current = &f;
        swapcontext(&l.scheduler, &f.context);
        l.current = nullptr;
        ran = true;
      }
      finished = finished && f.state == State::done;
    }
    if (l.error) std::rethrow_exception(l.error);
    if (finished) return;
    if (!release_barriers(l) && !ran) {
      throw std::runtime_error(
          "cuda_host: deadlock, the threads of a block wait at different barriers (a "
          "__syncthreads or warp shuffle that not all threads reach)");
    }
  }
}

// Runs `body` as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  Launch& l = launch_state();
  if (l.body) throw std::logic_error("cuda_host: a kernel launched from a kernel");
  l.grid = grid;
  l.block = block;
  l.threads = block.x * block.y * block.z;
  if (l.threads == 0 || l.threads > 1024) throw std::invalid_argument("cuda_host: block size");
  if (l.fibers.size() < l.threads) l.fibers.resize(l.threads);
  l.exchange.assign(l.threads, 0);
  l.body = &body;
  l.error = nullptr;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          l.block_index = dim3(x, y, z);
          run_block(l);
        }
      }
    }
  } catch (...) {
    l.body = nullptr;
    throw;
  }
  l.body = nullptr;
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

}  // namespace cuda_host

// ---- built-in variables and device functions
// ------------------------------------------------------

#define threadIdx (cuda_host::current_fiber().index)
#define blockIdx (cuda_host::launch_state().block_index)
#define blockDim (cuda_host::launch_state().block)
#define gridDim (cuda_host::launch_state().grid)

inline void __syncthreads() { cuda_host::wait_at(cuda_host::State::block_barrier); }

// Lane i gets lane i + delta's value (its own where that is past the warp), as on the GPU.
template <class T>
T __shfl_down_sync(unsigned, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>);
  cuda_host::Launch& l = cuda_host::launch_state();
  const unsigned self = cuda_host::current_fiber().linear;
  std::memcpy(&l.exchange[self], &value, sizeof(T));
  cuda_host::wait_at(cuda_host::State::warp_barrier);
  T result = value;
  const unsigned source = self + delta;
  if (self % 32 + delta < 32 && source < l.threads) {
    std::memcpy(&result, &l.exchange[source], sizeof(T));
  }
  cuda_host::wait_at(cuda_host::State::warp_barrier);  // before any lane writes its slot again
  return result;
}

// Kernels run when launched: the stream only names the order they already have.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t,
                   const Args&... args) {
  // The kernel's parameters by value, as a launch copies them; each thread calls with its own.
  const std::tuple<std::decay_t<Params>...> parameters(args...);
  cuda_host::run_grid(grid, block, [&] {
    std::tuple<std::decay_t<Params>...> own = parameters;
    std::apply(kernel, own);
  });
}

// ---- runtime API
// ----------------------------------------------------------------------------------

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_host::last_error();
  cuda_host::last_error() = cudaSuccess;
  return error;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_host::last_error(); }
inline const char* cudaGetErrorName(cudaError_t error) {
  return error == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated";
}
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "an emulated CUDA call failed";
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : (cuda_host::last_error() = cudaErrorInvalidDevice);
}
inline cudaError_t cudaDeviceSynchronize() {
  if (cuda_host::capturing()) return cuda_host::violate("cudaDeviceSynchronize");
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** data, std::size_t bytes) {
  if (cuda_host::capturing()) return cuda_host::violate("cudaMalloc");
  *data = cuda_host::allocate(bytes);
  return *data ? cudaSuccess : (cuda_host::last_error() = cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFree(void* data) {
  if (cuda_host::capturing()) return cuda_host::violate("cudaFree");
  return cuda_host::release(data);
}
inline cudaError_t cudaMallocFromPoolAsync(void** data, std::size_t bytes, cudaMemPool_t,
                                           cudaStream_t stream) {
  *data = cuda_host::allocate(bytes);
  if (!*data) return cuda_host::last_error() = cudaErrorMemoryAllocation;
  if (cuda_host::capturing(stream)) {
    cuda_host::Capture& c = cuda_host::capture();
    const std::lock_guard<std::mutex> lock(c.mutex);
    c.allocations.insert(*data);
  }
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* data, cudaStream_t stream) {
  cuda_host::Capture& c = cuda_host::capture();
  bool inside = false;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    inside = c.allocations.erase(data) > 0;
  }
  if (cuda_host::capturing(stream) && !inside) {
    return cuda_host::violate("cudaFreeAsync of memory allocated outside the capture");
  }
  if (!cuda_host::capturing(stream) && inside) {
    return cuda_host::violate("cudaFreeAsync outside the capture of memory it allocated");
  }
  return cuda_host::release(data);
}

inline cudaError_t cudaMemPoolCreate(cudaMemPool_t* pool, const cudaMemPoolProps*) {
  static char token;
  *pool = reinterpret_cast<cudaMemPool_t>(&token);
  return cudaSuccess;
}
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) {
  return cudaSuccess;
}

inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes,
                                            const void* pointer) {
  const bool device = cuda_host::block_of(pointer) != nullptr;
  attributes->type = device ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
  attributes->device = device ? 0 : -1;
  attributes->devicePointer = device ? const_cast<void*>(pointer) : nullptr;
  attributes->hostPointer = device ? nullptr : const_cast<void*>(pointer);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void* destination, const void* source, std::size_t bytes,
                              cudaMemcpyKind) {
  if (cuda_host::capturing()) return cuda_host::violate("cudaMemcpy (a synchronous copy)");
  if (bytes) std::memmove(destination, source, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* destination, const void* source, std::size_t bytes,
                                   cudaMemcpyKind, cudaStream_t) {
  // Host memory here is pageable (nothing is pinned): such a copy stages through the host.
  const bool device_only = bytes == 0 || (cuda_host::block_of(destination) != nullptr &&
                                          cuda_host::block_of(source) != nullptr);
  if (cuda_host::capturing() && !device_only) {
    return cuda_host::violate("cudaMemcpyAsync from or to host memory");
  }
  if (bytes) std::memmove(destination, source, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  if (cuda_host::capturing()) return cuda_host::violate("cudaStreamSynchronize");
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  *stream = new CUstream_st;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  *status =
      cuda_host::capturing(stream) ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
inline cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  cuda_host::Capture& c = cuda_host::capture();
  const std::lock_guard<std::mutex> lock(c.mutex);
  if (c.stream || !stream || stream == cudaStreamLegacy) {
    return cuda_host::last_error() = cudaErrorInvalidValue;
  }
  c.stream = stream;
  ++c.id;
  c.allocations.clear();
  c.failed = false;
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  cuda_host::Capture& c = cuda_host::capture();
  const std::lock_guard<std::mutex> lock(c.mutex);
  if (!c.stream || c.stream != stream) return cuda_host::last_error() = cudaErrorInvalidValue;
  for (std::size_t i = 0; i < c.allocations.size(); ++i) {
    c.violations.push_back("a stream-ordered allocation of the capture not freed before it ends");
    c.failed = true;
  }
  c.allocations.clear();
  c.stream = nullptr;
  static char token;
  *graph = c.failed ? nullptr : reinterpret_cast<cudaGraph_t>(&token);
  if (!c.failed) return cudaSuccess;
  return cuda_host::last_error() = cudaErrorStreamCaptureUnsupported;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  *event = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  cuda_host::Capture& c = cuda_host::capture();
  const std::lock_guard<std::mutex> lock(c.mutex);
  event->capture = c.stream && c.stream == stream ? c.id : 0;
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) {
  if (cuda_host::capturing()) return cuda_host::violate("cudaEventSynchronize");
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  long active = 0;
  {
    cuda_host::Capture& c = cuda_host::capture();
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (c.stream) active = c.id;
  }
  const bool captured_stream = cuda_host::capturing(stream);
  if (captured_stream && event->capture != active) {
    return cuda_host::violate(
        "the captured stream waits for an event recorded outside the capture");
  }
  if (!captured_stream && active != 0 && event->capture == active) {
    return cuda_host::violate("another stream waits for an event recorded in the capture");
  }
  return cudaSuccess;
}
