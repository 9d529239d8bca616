// Conversion of nanobind ndarrays (NumPy, or any DLPack producer) into the core's strided
// views, without copies.
#pragma once

#include <nanobind/ndarray.h>

#include "batchnorm/batchnorm.hpp"

namespace batchnorm::python {

namespace nb = nanobind;

using InputArray = nb::ndarray<nb::ro>;
using OutputArray = nb::ndarray<>;

// Element types as the Python side names them; `bfloat16` reinterprets 16-bit unsigned data
// (NumPy has no native bfloat16; ml_dtypes arrays arrive viewed as uint16).
TensorRef to_tensor(const InputArray& array, const char* name, bool bfloat16 = false);
TensorRef to_tensor(const OutputArray& array, const char* name, bool bfloat16 = false);

// A boolean mask (bool or uint8 0/1 data) of the input's rank.
TensorRef to_mask(const InputArray& array);

// Pointer to the data of a contiguous 1-D weight vector of length n (nullptr for None).
void* weight_pointer(const nb::handle& array, std::int64_t n, DType dtype, const Device& device,
                     const char* name);

}  // namespace batchnorm::python
