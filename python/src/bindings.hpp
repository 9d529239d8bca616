// Registration functions of the extension's areas, called from module.cpp.
#pragma once

#include <nanobind/nanobind.h>

namespace batchnorm::python {

void bind_operations(nanobind::module_& m);
void bind_weights(nanobind::module_& m);
void bind_communicator(nanobind::module_& m);
void bind_cuda(nanobind::module_& m);
void bind_buffers(nanobind::module_& m);
void bind_access(nanobind::module_& m);

}  // namespace batchnorm::python
