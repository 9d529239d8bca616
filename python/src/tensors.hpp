// Conversion of nanobind ndarrays (NumPy, or any DLPack producer) into the core's strided
// views, without copies.
#pragma once

#include <nanobind/ndarray.h>

#include <string>

#include "batchnorm/batchnorm.hpp"

namespace batchnorm::python {

namespace nb = nanobind;

using InputArray = nb::ndarray<nb::ro>;
using OutputArray = nb::ndarray<>;

// Each array's element type comes from the array itself. 16-bit unsigned data is read as
// bfloat16: NumPy has no native bfloat16, so ml_dtypes arrays arrive viewed as uint16 (integer
// data is converted to a float type before it gets here, so uint16 has no other meaning).
TensorRef to_tensor(const OutputArray& array, const char* name);

// An array argument of one call, read as a TensorRef. An exact NumPy array is read through the
// buffer protocol: a DLPack export on every call costs more than the smallest kernels (a capsule
// and a managed tensor per array). Anything else, and any NumPy array the buffer protocol cannot
// describe (ml_dtypes' bfloat16, foreign byte order), is imported by nanobind as before, so both
// paths accept and refuse the same arrays.
class ArrayArgument {
 public:
  enum class Access { read, write };
  ArrayArgument(nb::handle object, const char* name, Access access);
  // Reads an exact NumPy array through the buffer protocol only, and only where its elements are
  // float16/32/64 at addresses aligned to their size; anything else is left unread (`read()`
  // false) for the general path to take, with its conversions and its errors.
  ArrayArgument(nb::handle object, Access access);
  ~ArrayArgument();
  ArrayArgument(const ArrayArgument&) = delete;
  ArrayArgument& operator=(const ArrayArgument&) = delete;

  const TensorRef& tensor() const { return tensor_; }
  bool read() const { return holds_buffer_; }

 private:
  bool read_buffer(nb::handle object, Access access);

  Py_buffer buffer_{};
  bool holds_buffer_ = false;
  InputArray input_;  // a DLPack import, kept alive for the call
  OutputArray output_;
  TensorRef tensor_;
};

// DLPack's dtype for a dtype name ("float32", "bfloat16", ...).
nb::dlpack::dtype dlpack_dtype(const std::string& name);

// A boolean mask (bool or uint8 0/1 data) of the input's rank.
TensorRef to_mask(const InputArray& array);

// Pointer to the data of a contiguous 1-D weight vector of length n (nullptr for None).
void* weight_pointer(const nb::handle& array, std::int64_t n, DType dtype, const Device& device,
                     const char* name);

}  // namespace batchnorm::python
