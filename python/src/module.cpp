// The private extension module batchnorm._core; the user-facing API lives in Python.
#include <nanobind/nanobind.h>

#include "bindings.hpp"

NB_MODULE(_core, m) {
  m.doc() =
      "Compiled kernels of the batchnorm package (private; use batchnorm.BatchNormalization).";
  // A layer's Options and TrainingContext can be owned by another framework's objects that the
  // interpreter never frees at exit: an autograd graph that was built but not differentiated
  // holds its Function's ctx, and through it the layer. nanobind then reports them as leaked
  // when this module is torn down first, although nothing leaks while the program runs
  // (tests/test_package.py checks both: no growth over many calls, no report at exit).
  nanobind::set_leak_warnings(false);
  batchnorm::python::bind_communicator(m);
  batchnorm::python::bind_access(m);
  batchnorm::python::bind_weights(m);
  batchnorm::python::bind_operations(m);
  batchnorm::python::bind_cuda(m);
  batchnorm::python::bind_buffers(m);
}
