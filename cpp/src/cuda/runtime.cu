// CUDA runtime services: device discovery that never throws (so cuda_available() is safe on
// machines without a driver or GPU), the calling thread's stream as a cudaStream_t, error checks,
// the device scope of a pointer and raw device buffers. The runtime is linked statically, so the
// library loads without any CUDA library installed and only finds the driver when first used.
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

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
  const int device = device_of(pointer);
  if (device < 0) {
    throw std::invalid_argument(std::string("batchnorm (CUDA): ") + what +
                                " is not CUDA device memory");
  }
  check(cudaGetDevice(&previous_), "cudaGetDevice");
  if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
}

DeviceScope::~DeviceScope() { cudaSetDevice(previous_); }

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

void copy(void* destination, const void* source, std::size_t bytes) {
  if (bytes == 0) return;
  const int device = device_of(destination) >= 0 ? device_of(destination) : device_of(source);
  if (device >= 0) synchronize(device);
  check(cudaMemcpy(destination, source, bytes, cudaMemcpyDefault), "cudaMemcpy");
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
