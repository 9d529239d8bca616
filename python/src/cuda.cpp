// Bindings of the CUDA services the Python package needs beside the layer operations: the
// calling thread's stream, and device buffers for the layer's weights and for outputs of
// frameworks whose arrays cannot be written (JAX). Builds without CUDA raise on use.
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "bindings.hpp"
#include "cuda/runtime.hpp"
#include "tensors.hpp"

namespace batchnorm::python {

namespace nb = nanobind;

namespace {

// A C-contiguous device array owned by the returned object (freed when it is collected). It
// exports DLPack, so frameworks wrap it without a copy.
nb::ndarray<> cuda_empty(const std::vector<std::size_t>& shape, const std::string& dtype,
                         int device) {
  const nb::dlpack::dtype dt = dlpack_dtype(dtype);
  std::size_t count = 1;
  for (std::size_t n : shape) count *= n;
  void* data = cuda::allocate(count * dt.bits / 8, device);
  nb::capsule owner(data, [](void* p) noexcept { cuda::release(p); });
  return nb::ndarray<>(data, shape.size(), shape.data(), owner, nullptr, dt,
                       nb::device::cuda::value, device);
}

// The same for a call's own vectors: allocated in the calling thread's stream order and freed
// in stream order after the work recorded with cuda_used (cuda::allocate_on_stream).
nb::ndarray<> cuda_empty_on_stream(const std::vector<std::size_t>& shape, const std::string& dtype,
                                   int device) {
  const nb::dlpack::dtype dt = dlpack_dtype(dtype);
  std::size_t count = 1;
  for (std::size_t n : shape) count *= n;
  void* data = cuda::allocate_on_stream(count * dt.bits / 8, device);
  nb::capsule owner(data, [](void* p) noexcept { cuda::release_after_use(p); });
  return nb::ndarray<>(data, shape.size(), shape.data(), owner, nullptr, dt,
                       nb::device::cuda::value, device);
}

std::size_t contiguous_bytes(const nb::ndarray<nb::ro>& array, const char* name) {
  std::int64_t expected = 1;
  for (std::size_t i = array.ndim(); i-- > 0;) {
    if (array.shape(i) != 1 && array.stride(i) != expected) {
      throw nb::value_error((std::string("cuda_copy: ") + name + " is not C-contiguous").c_str());
    }
    expected *= static_cast<std::int64_t>(array.shape(i));
  }
  return array.nbytes();
}

std::size_t checked_bytes(const nb::ndarray<>& destination, const nb::ndarray<nb::ro>& source) {
  const std::size_t bytes = contiguous_bytes(nb::ndarray<nb::ro>(destination), "destination");
  if (bytes != contiguous_bytes(source, "source")) {
    throw nb::value_error("cuda_copy: source and destination differ in size");
  }
  return bytes;
}

// Copies all bytes of `source` into `destination` (host or device, same size, contiguous) and
// returns once they have arrived (cuda::copy).
void cuda_copy(const nb::ndarray<>& destination, const nb::ndarray<nb::ro>& source) {
  const std::size_t bytes = checked_bytes(destination, source);
  nb::gil_scoped_release released;
  cuda::copy(destination.data(), source.data(), bytes);
}

// The same, queued on the calling thread's stream (cuda::copy_on_stream).
void cuda_copy_on_stream(const nb::ndarray<>& destination, const nb::ndarray<nb::ro>& source) {
  const std::size_t bytes = checked_bytes(destination, source);
  nb::gil_scoped_release released;
  cuda::copy_on_stream(destination.data(), source.data(), bytes);
}

}  // namespace

void bind_cuda(nb::module_& m) {
  m.def(
      "set_cuda_stream",
      [](std::uintptr_t stream) { set_cuda_stream(reinterpret_cast<void*>(stream)); },
      nb::arg("stream"),
      "Sets the CUDA stream (a cudaStream_t as an int; 0 = legacy default) for this thread.");
  m.def("cuda_device_count", &cuda::device_count, "Number of usable CUDA devices (0 without).");
  m.def("cuda_empty", &cuda_empty, nb::arg("shape"), nb::arg("dtype"), nb::arg("device"),
        "An uninitialized C-contiguous array on CUDA device `device`, exporting DLPack.");
  m.def("cuda_copy", &cuda_copy, nb::arg("destination").noconvert(), nb::arg("source"),
        "Copies between host and device arrays of the same size; returns when done.");
  m.def("cuda_empty_on_stream", &cuda_empty_on_stream, nb::arg("shape"), nb::arg("dtype"),
        nb::arg("device"),
        "cuda_empty in this thread's stream order, freed in stream order after its uses.");
  m.def(
      "cuda_used", [](const nb::ndarray<>& array) { cuda::used(array.data()); },
      nb::arg("array").noconvert(),
      "Records that the work queued now on this thread's stream uses a cuda_empty_on_stream "
      "array (it is freed only after that work).");
  m.def("cuda_copy_on_stream", &cuda_copy_on_stream, nb::arg("destination").noconvert(),
        nb::arg("source"),
        "Queues a copy between host and device arrays of the same size on this thread's stream "
        "(a host source may be reused once it returns).");
  m.def(
      "cuda_wait_stream",
      [](std::uintptr_t producer, int device) {
        cuda::wait_for_stream(reinterpret_cast<void*>(producer), device);
      },
      nb::arg("producer"), nb::arg("device"),
      "Makes this thread's stream wait on the device for the work queued so far on `producer`.");
  m.def(
      "cuda_synchronize", [](int device) { cuda::synchronize(device); }, nb::arg("device"),
      "Waits for all work queued on the CUDA device.");
}

}  // namespace batchnorm::python
