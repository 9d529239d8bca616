// Binding of the cross-process Communicator hook to a Python callable, so synchronized layers can
// use mpi4py (or any transport) without the extension linking an MPI library: the MPI ABI then
// stays the choice of the user's mpi4py, and a wheel built without MPI still synchronizes.
#include <nanobind/ndarray.h>

#include <cstddef>

#include "batchnorm/batchnorm.hpp"
#include "bindings.hpp"

namespace batchnorm::python {

namespace nb = nanobind;

namespace {

using SendArray = nb::ndarray<nb::numpy, const double, nb::ndim<1>, nb::c_contig>;
using ReceiveArray = nb::ndarray<nb::numpy, double, nb::ndim<1>, nb::c_contig>;

void init_communicator(Communicator* self, int size, nb::callable allgather) {
  if (size < 1) throw nb::value_error("Communicator: size must be >= 1");
  // The kernels run with the GIL released; the callback takes it back for the Python call. The
  // arrays view the core's buffers (no copies) and are valid only during the call.
  auto call = [callback = nb::object(allgather), size](const double* send, double* receive,
                                                       std::size_t count) {
    nb::gil_scoped_acquire acquired;
    const SendArray send_array(send, {count}, nb::handle());
    const ReceiveArray receive_array(receive, {count * static_cast<std::size_t>(size)},
                                     nb::handle());
    callback(nb::cast(send_array, nb::rv_policy::reference),
             nb::cast(receive_array, nb::rv_policy::reference));
  };
  new (self) Communicator{size, call};
}

}  // namespace

void bind_communicator(nb::module_& m) {
  nb::class_<Communicator>(
      m, "Communicator",
      "Cross-process reduction hook of synchronized layers: allgather(send, receive) must gather "
      "the float64 vector `send` of every one of `size` processes into `receive` "
      "(size * len(send) values, in rank order).")
      .def("__init__", &init_communicator, nb::arg("size"), nb::arg("allgather"))
      .def_ro("size", &Communicator::size);
}

}  // namespace batchnorm::python
