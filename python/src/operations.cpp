// Bindings of the layer operations: Options, TrainingContext and the four entry points. The GIL
// is released around every kernel; weights are updated in place.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.hpp"
#include "tensors.hpp"

namespace batchnorm::python {

namespace {

using WeightList = std::vector<nb::object>;

// The seven per-feature vectors in Keras order, any of them None where absent.
Weights to_weights(const WeightList& list, const TensorRef& x, std::int64_t features) {
  if (list.size() != 7) {
    throw nb::value_error(
        "weights: expected [gamma, beta, moving_mean, moving_variance, "
        "moving_stddev, renorm_mean, renorm_stddev]");
  }
  static const char* const names[] = {"gamma",           "beta",          "moving_mean",
                                      "moving_variance", "moving_stddev", "renorm_mean",
                                      "renorm_stddev"};
  Weights w;
  w.dtype = weight_dtype(x.dtype);
  w.device = x.device;
  void** slots[] = {&w.gamma,         &w.beta,        &w.moving_mean,  &w.moving_variance,
                    &w.moving_stddev, &w.renorm_mean, &w.renorm_stddev};
  for (std::size_t i = 0; i < list.size(); ++i) {
    *slots[i] = weight_pointer(list[i], features, w.dtype, x.device, names[i]);
  }
  return w;
}

std::int64_t features_of(const TensorRef& x, const Options& options) {
  return feature_count(std::vector<std::int64_t>(x.shape.begin(), x.shape.begin() + x.rank),
                       options);
}

void train_forward_binding(const InputArray& x_array, const OutputArray& y_array,
                           const std::optional<InputArray>& mask_array, const Options& options,
                           const WeightList& weight_list, const nb::object& adjust_scale,
                           const nb::object& adjust_bias, bool update_moving,
                           TrainingContext& context, bool bfloat16,
                           const Communicator* communicator) {
  const TensorRef x = to_tensor(x_array, "input", bfloat16);
  const TensorRef y = to_tensor(y_array, "output", bfloat16);
  TensorRef mask;
  if (mask_array) mask = to_mask(*mask_array);
  const std::int64_t features = features_of(x, options);
  const Weights weights = to_weights(weight_list, x, features);
  Adjustment adjustment;
  adjustment.scale =
      weight_pointer(adjust_scale, features, weights.dtype, x.device, "adjustment scale");
  adjustment.bias =
      weight_pointer(adjust_bias, features, weights.dtype, x.device, "adjustment bias");
  const bool adjusted = adjustment.scale || adjustment.bias;
  nb::gil_scoped_release released;
  train_forward(x, y, mask_array ? &mask : nullptr, options, weights,
                adjusted ? &adjustment : nullptr, update_moving, context, communicator);
}

void infer_forward_binding(const InputArray& x_array, const OutputArray& y_array,
                           const Options& options, const WeightList& weight_list, bool bfloat16) {
  const TensorRef x = to_tensor(x_array, "input", bfloat16);
  const TensorRef y = to_tensor(y_array, "output", bfloat16);
  const Weights weights = to_weights(weight_list, x, features_of(x, options));
  nb::gil_scoped_release released;
  infer_forward(x, y, options, weights);
}

void train_backward_binding(const InputArray& dy_array, const InputArray& x_array,
                            const OutputArray& dx_array,
                            const std::optional<InputArray>& mask_array, const Options& options,
                            const WeightList& weight_list, const TrainingContext& context,
                            const nb::object& dgamma, const nb::object& dbeta, bool bfloat16,
                            const Communicator* communicator) {
  const TensorRef dy = to_tensor(dy_array, "dy", bfloat16);
  const TensorRef x = to_tensor(x_array, "input", bfloat16);
  const TensorRef dx = to_tensor(dx_array, "dx", bfloat16);
  TensorRef mask;
  if (mask_array) mask = to_mask(*mask_array);
  const std::int64_t features = features_of(x, options);
  const Weights weights = to_weights(weight_list, x, features);
  void* dgamma_ptr = weight_pointer(dgamma, features, weights.dtype, x.device, "dgamma");
  void* dbeta_ptr = weight_pointer(dbeta, features, weights.dtype, x.device, "dbeta");
  nb::gil_scoped_release released;
  train_backward(dy, x, dx, mask_array ? &mask : nullptr, options, weights, context, dgamma_ptr,
                 dbeta_ptr, communicator);
}

void infer_backward_binding(const InputArray& dy_array, const InputArray& x_array,
                            const OutputArray& dx_array, const Options& options,
                            const WeightList& weight_list, const nb::object& dgamma,
                            const nb::object& dbeta, bool bfloat16) {
  const TensorRef dy = to_tensor(dy_array, "dy", bfloat16);
  const TensorRef x = to_tensor(x_array, "input", bfloat16);
  const TensorRef dx = to_tensor(dx_array, "dx", bfloat16);
  const std::int64_t features = features_of(x, options);
  const Weights weights = to_weights(weight_list, x, features);
  void* dgamma_ptr = weight_pointer(dgamma, features, weights.dtype, x.device, "dgamma");
  void* dbeta_ptr = weight_pointer(dbeta, features, weights.dtype, x.device, "dbeta");
  nb::gil_scoped_release released;
  infer_backward(dy, x, dx, options, weights, dgamma_ptr, dbeta_ptr);
}

}  // namespace

void bind_operations(nb::module_& m) {
  nb::class_<Options>(m, "Options", "Layer hyper-parameters passed to the kernels.")
      .def(nb::init<>())
      .def_rw("axes", &Options::axes)
      .def_rw("momentum", &Options::momentum)
      .def_rw("epsilon", &Options::epsilon)
      .def_rw("center", &Options::center)
      .def_rw("scale", &Options::scale)
      .def_rw("renorm", &Options::renorm)
      .def_rw("renorm_momentum", &Options::renorm_momentum)
      .def_rw("rmin", &Options::rmin)
      .def_rw("rmax", &Options::rmax)
      .def_rw("dmax", &Options::dmax)
      .def_rw("virtual_batch_size", &Options::virtual_batch_size);

  m.def("validate", &validate, nb::arg("options"),
        "Raises ValueError naming the first option outside its range.");
  nb::class_<WeightSchema>(m, "WeightSchema",
                           "The weights of a layer with given options for inputs of a shape.")
      .def_ro("axes", &WeightSchema::axes)
      .def_ro("feature_shape", &WeightSchema::feature_shape)
      .def_ro("features", &WeightSchema::features)
      .def_ro("weight_shape", &WeightSchema::weight_shape)
      .def_ro("names", &WeightSchema::names);
  m.def("weight_schema", &weight_schema, nb::arg("options"), nb::arg("input_shape"),
        "The resolved feature axes, feature shape and count, Keras' weight shape and the weight "
        "names in Keras order (validates the options and the axes against the shape).");
  m.def("weight_names", &weight_names, nb::arg("options"),
        "The weight names in Keras order for these options.");

  nb::class_<TrainingContext>(m, "TrainingContext",
                              "Statistics a training forward keeps for its backward pass.")
      .def(nb::init<>())
      .def_ro("groups", &TrainingContext::groups)
      .def_ro("features", &TrainingContext::features);

  m.def("train_forward", &train_forward_binding, nb::arg("x"), nb::arg("y").noconvert(),
        nb::arg("mask").none(), nb::arg("options"), nb::arg("weights"),
        nb::arg("adjust_scale").none(), nb::arg("adjust_bias").none(), nb::arg("update_moving"),
        nb::arg("context"), nb::arg("bfloat16") = false,
        nb::arg("communicator").none() = nb::none(),
        "Training forward pass; updates the moving statistics in place when update_moving. With a "
        "communicator of size > 1 the statistics are those of every process's batch.");
  m.def("infer_forward", &infer_forward_binding, nb::arg("x"), nb::arg("y").noconvert(),
        nb::arg("options"), nb::arg("weights"), nb::arg("bfloat16") = false,
        "Inference forward pass with the moving statistics.");
  m.def(
      "train_backward", &train_backward_binding, nb::arg("dy"), nb::arg("x"),
      nb::arg("dx").noconvert(), nb::arg("mask").none(), nb::arg("options"), nb::arg("weights"),
      nb::arg("context"), nb::arg("dgamma").none(), nb::arg("dbeta").none(),
      nb::arg("bfloat16") = false, nb::arg("communicator").none() = nb::none(),
      "Backward of train_forward: writes dx, dgamma and dbeta (synchronized as the forward was).");
  m.def("infer_backward", &infer_backward_binding, nb::arg("dy"), nb::arg("x"),
        nb::arg("dx").noconvert(), nb::arg("options"), nb::arg("weights"), nb::arg("dgamma").none(),
        nb::arg("dbeta").none(), nb::arg("bfloat16") = false, "Backward of infer_forward.");
  m.def("cuda_available", &cuda_available,
        "Whether this build has the CUDA backend and a CUDA device is visible.");
}

}  // namespace batchnorm::python
