// The private extension module batchnorm._core; the user-facing API lives in Python.
#include <nanobind/nanobind.h>

#include "bindings.hpp"

NB_MODULE(_core, m) {
  m.doc() =
      "Compiled kernels of the batchnorm package (private; use batchnorm.BatchNormalization).";
  batchnorm::python::bind_communicator(m);
  batchnorm::python::bind_operations(m);
  batchnorm::python::bind_cuda(m);
}
