// CUDA runtime services: device discovery that never throws (so cuda_available() is safe on
// machines without a driver or GPU), the calling thread's stream as a cudaStream_t, error checks,
// the device scope of a pointer and raw device buffers. The runtime is linked statically, so the
// library loads without any CUDA library installed and only finds the driver when first used.
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "cuda/launch.hpp"
#include "cuda/runtime.hpp"

namespace batchnorm::cuda {

void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  throw std::runtime_error(std::string("batchnorm (CUDA): ") + what + " failed: " +
                           cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

cudaStream_t current_stream() { return static_cast<cudaStream_t>(cuda_stream()); }

cudaMemPool_t scratch_pool() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  static std::mutex mutex;
  static std::map<int, cudaMemPool_t> pools;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = pools.find(device);
  if (found != pools.end()) return found->second;
  cudaMemPoolProps properties{};
  properties.allocType = cudaMemAllocationTypePinned;
  properties.location.type = cudaMemLocationTypeDevice;
  properties.location.id = device;
  cudaMemPool_t pool = nullptr;
  check(cudaMemPoolCreate(&pool, &properties), "creating the scratch memory pool");
  std::uint64_t keep = UINT64_MAX;
  check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
        "configuring the scratch memory pool");
  pools.emplace(device, pool);
  return pool;
}

bool release_stream(cudaStream_t* stream) noexcept {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  static std::mutex mutex;
  static std::map<int, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t& made = streams[device];
  if (!made && cudaStreamCreateWithFlags(&made, cudaStreamNonBlocking) != cudaSuccess) {
    cudaGetLastError();
    made = nullptr;
    return false;
  }
  *stream = made;
  return true;
}

namespace {

// The device owning `pointer`, or -1 when it is not device (or managed) memory.
int device_of(const void* pointer) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, pointer) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  const bool on_device =
      attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
  return on_device ? attributes.device : -1;
}

}  // namespace

DeviceScope::DeviceScope(const void* pointer, const char* what) {
  device_ = device_of(pointer);
  if (device_ < 0) {
    throw std::invalid_argument(std::string("batchnorm (CUDA): ") + what +
                                " is not CUDA device memory");
  }
  enter();
}

DeviceScope::DeviceScope(int device) : device_(device) { enter(); }

void DeviceScope::enter() {
  check(cudaGetDevice(&previous_), "cudaGetDevice");
  if (device_ != previous_) check(cudaSetDevice(device_), "cudaSetDevice");
}

DeviceScope::~DeviceScope() {
  if (device_ != previous_) cudaSetDevice(previous_);
}

void check_operands(int device, std::initializer_list<Operand> operands) {
  for (const Operand& operand : operands) {
    if (!operand.used) continue;
    cudaPointerAttributes attributes{};
    const cudaError_t status = cudaPointerGetAttributes(&attributes, operand.data);
    if (status != cudaSuccess) cudaGetLastError();
    const bool managed = status == cudaSuccess && attributes.type == cudaMemoryTypeManaged;
    const bool here = status == cudaSuccess && attributes.type == cudaMemoryTypeDevice &&
                      attributes.device == device;
    if (managed || here) continue;
    std::string found = "host memory";
    if (status == cudaSuccess && attributes.type == cudaMemoryTypeDevice) {
      found = "memory of CUDA device " + std::to_string(attributes.device);
    } else if (status == cudaSuccess && attributes.type == cudaMemoryTypeHost) {
      found = "pinned host memory";
    }
    throw std::invalid_argument(std::string("batchnorm (CUDA): ") + operand.name +
                                " must be memory of CUDA device " + std::to_string(device) +
                                " (where the weights are), but it is " + found);
  }
}

void check_earlier_errors() {
  const cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) return;
  throw std::runtime_error(
      std::string("batchnorm (CUDA): an earlier CUDA operation of this thread failed, before this "
                  "call queued any work: ") +
      cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

void launched(const char* what, cudaStream_t stream) {
  check(cudaGetLastError(), what);
#ifndef NDEBUG
  // Debug builds wait for each kernel, so that a fault names the kernel that caused it (not a
  // later call); not while a CUDA graph captures the stream, where waiting is illegal.
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing");
  if (capturing == cudaStreamCaptureStatusNone) check(cudaStreamSynchronize(stream), what);
#else
  (void)stream;
#endif
}

bool built() { return true; }

int device_count() {
  int count = 0;
  // Without a driver this reports cudaErrorInsufficientDriver / cudaErrorNoDevice: no devices.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

void* allocate(std::size_t bytes, int device) {
  if (device < 0 || device >= device_count()) {
    throw std::invalid_argument("batchnorm (CUDA): no CUDA device " + std::to_string(device));
  }
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  check(cudaSetDevice(device), "cudaSetDevice");
  void* data = nullptr;
  const cudaError_t status = cudaMalloc(&data, bytes > 0 ? bytes : 1);
  cudaSetDevice(previous);
  check(status, "cudaMalloc");
  return data;
}

void release(void* data) noexcept {
  if (data == nullptr) return;
  const int device = device_of(data);
  int previous = 0;
  if (device < 0 || cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaFree(data);
  cudaSetDevice(previous);
  cudaGetLastError();
}

namespace {

// The stream-ordered allocations of allocate_on_stream: their device and one event per queued
// use (recorded on the stream of that use), which the release waits for.
struct Uses {
  int device = 0;
  std::vector<cudaEvent_t> events;
};

// Never destroyed: Python may free its arrays after static destructors have run.
struct UseRegistry {
  std::mutex mutex;
  std::map<void*, Uses> entries;
};

UseRegistry& registry() {
  static UseRegistry* made = new UseRegistry;
  return *made;
}

}  // namespace

void* allocate_on_stream(std::size_t bytes, int device) {
  const DeviceScope scope(device);
  void* data = nullptr;
  check(cudaMallocFromPoolAsync(&data, bytes > 0 ? bytes : 1, scratch_pool(), current_stream()),
        "allocating device memory");
  {
    const std::lock_guard<std::mutex> lock(registry().mutex);
    registry().entries[data].device = device;
  }
  used(data);  // the allocation itself is queued on this stream
  return data;
}

void used(void* data) {
  cudaEvent_t event = nullptr;
  int device = 0;
  {
    const std::lock_guard<std::mutex> lock(registry().mutex);
    const auto found = registry().entries.find(data);
    if (found == registry().entries.end()) return;  // allocate()'s: cudaFree waits for the device
    device = found->second.device;
  }
  const DeviceScope scope(device);
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  const cudaError_t status = cudaEventRecord(event, current_stream());
  if (status != cudaSuccess) {
    cudaEventDestroy(event);
    check(status, "recording a use of device memory");
  }
  const std::lock_guard<std::mutex> lock(registry().mutex);
  registry().entries[data].events.push_back(event);
}

void release_after_use(void* data) noexcept {
  Uses entry;
  {
    const std::lock_guard<std::mutex> lock(registry().mutex);
    const auto found = registry().entries.find(data);
    if (found == registry().entries.end()) return;
    entry = std::move(found->second);
    registry().entries.erase(found);
  }
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  if (previous != entry.device) cudaSetDevice(entry.device);
  cudaStream_t stream = nullptr;
  const bool ordered = release_stream(&stream);
  for (cudaEvent_t event : entry.events) {
    if (ordered) cudaStreamWaitEvent(stream, event, 0);
    cudaEventDestroy(event);  // freed by CUDA once the wait has passed
  }
  if (ordered) {
    cudaFreeAsync(data, stream);
  } else {
    cudaFree(data);
  }
  if (previous != entry.device) cudaSetDevice(previous);
  cudaGetLastError();
}

void copy(void* destination, const void* source, std::size_t bytes) {
  if (bytes == 0) return;
  const int device = device_of(destination) >= 0 ? device_of(destination) : device_of(source);
  if (device < 0) {
    throw std::invalid_argument("batchnorm (CUDA): a copy needs device memory on one side");
  }
  synchronize(device);
  const DeviceScope scope(device);
  // On the legacy stream, then waited for: cudaMemcpy from pageable memory may return once the
  // data are staged, before they reach the device.
  check(cudaMemcpyAsync(destination, source, bytes, cudaMemcpyDefault, cudaStreamLegacy),
        "cudaMemcpyAsync");
  check(cudaStreamSynchronize(cudaStreamLegacy), "waiting for a copy");
}

void copy_on_stream(void* destination, const void* source, std::size_t bytes) {
  if (bytes == 0) return;
  const int device = device_of(destination) >= 0 ? device_of(destination) : device_of(source);
  if (device < 0) {
    throw std::invalid_argument("batchnorm (CUDA): a copy needs device memory on one side");
  }
  const DeviceScope scope(device);
  check(cudaMemcpyAsync(destination, source, bytes, cudaMemcpyDefault, current_stream()),
        "cudaMemcpyAsync");
}

void wait_for_stream(void* producer, int device) {
  const DeviceScope scope(device);
  const cudaStream_t consumer = current_stream();
  if (static_cast<cudaStream_t>(producer) == consumer) return;
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  // The event may be destroyed while the wait is pending: CUDA frees it once it completes.
  cudaError_t status = cudaEventRecord(event, static_cast<cudaStream_t>(producer));
  if (status == cudaSuccess) status = cudaStreamWaitEvent(consumer, event, 0);
  cudaEventDestroy(event);
  check(status, "ordering the operand's stream before the kernels' stream");
}

void synchronize(int device) {
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  check(cudaSetDevice(device), "cudaSetDevice");
  const cudaError_t status = cudaDeviceSynchronize();
  cudaSetDevice(previous);
  check(status, "cudaDeviceSynchronize");
}

}  // namespace batchnorm::cuda
