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
TensorRef to_tensor(const InputArray& array, const char* name);
TensorRef to_tensor(const OutputArray& array, const char* name);

// DLPack's dtype for a dtype name ("float32", "bfloat16", ...).
nb::dlpack::dtype dlpack_dtype(const std::string& name);

// A boolean mask (bool or uint8 0/1 data) of the input's rank.
TensorRef to_mask(const InputArray& array);

// Pointer to the data of a contiguous 1-D weight vector of length n (nullptr for None).
void* weight_pointer(const nb::handle& array, std::int64_t n, DType dtype, const Device& device,
                     const char* name);

}  // namespace batchnorm::python
