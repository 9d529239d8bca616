// BoundWeights: a layer's weight vectors checked and resolved once, then read by every call.
#include "weights.hpp"

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstring>

namespace batchnorm::python {

namespace {

std::string message(const std::string& name, const std::string& what) { return name + ": " + what; }

}  // namespace

BoundWeights::BoundWeights(const nb::kwargs& vectors) {
  for (auto [key, value] : vectors) {
    const std::string name = nb::cast<std::string>(key);
    void** slot = weight_slot(weights_, name);
    if (!slot) throw nb::type_error(("unexpected keyword argument '" + name + "'").c_str());
    if (value.is_none()) continue;
    OutputArray array;
    if (!nb::try_cast(value, array)) {
      throw nb::type_error(message(name, "expected a writable array (NumPy or DLPack)").c_str());
    }
    const TensorRef t = to_tensor(array, name.c_str());
    const std::int64_t length = t.rank == 1 ? t.shape[0] : -1;
    if (length < 0 || (length > 1 && t.strides[0] != 1)) {
      throw nb::value_error(message(name, "expected a contiguous 1-D vector").c_str());
    }
    if (t.dtype != DType::float32 && t.dtype != DType::float64) {
      throw nb::type_error(message(name, std::string("expected float32 or float64 weights, got ") +
                                             dtype_name(t.dtype))
                               .c_str());
    }
    if (arrays_.empty()) {
      weights_.dtype = t.dtype;
      weights_.device = t.device;
      features_ = length;
    } else if (t.dtype != weights_.dtype) {
      throw nb::type_error(message(name, std::string("dtype ") + dtype_name(t.dtype) +
                                             " differs from " + arrays_.front().first + "'s " +
                                             dtype_name(weights_.dtype))
                               .c_str());
    } else if (t.device.type != weights_.device.type || t.device.index != weights_.device.index) {
      throw nb::value_error(
          message(name, "every weight must live on the same device as " + arrays_.front().first)
              .c_str());
    } else if (length != features_) {
      throw nb::value_error(message(name, std::to_string(length) + " values, but " +
                                              arrays_.front().first + " has " +
                                              std::to_string(features_))
                                .c_str());
    }
    *slot = t.data;
    arrays_.emplace_back(name, nb::borrow(value));
  }
}

Weights BoundWeights::for_input(const TensorRef& x, std::int64_t features) const {
  if (arrays_.empty()) {  // nothing bound: nothing to fit (the core says
    Weights none;         // which weights the operation needs)
    none.dtype = weight_dtype(x.dtype);
    none.device = x.device;
    return none;
  }
  const std::string& name = arrays_.front().first;
  const DType expected = weight_dtype(x.dtype);
  if (weights_.dtype != expected) {
    throw nb::type_error(message(name, std::string("expected dtype ") + dtype_name(expected) +
                                           " for " + dtype_name(x.dtype) + " data, got " +
                                           dtype_name(weights_.dtype))
                             .c_str());
  }
  if (weights_.device.type != x.device.type || weights_.device.index != x.device.index) {
    throw nb::value_error(
        message(name, "weights must live on the same device as the input").c_str());
  }
  if (features_ != features) {
    throw nb::value_error(message(name, "expected a contiguous vector of " +
                                            std::to_string(features) + " elements, got " +
                                            std::to_string(features_))
                              .c_str());
  }
  return weights_;
}

BoundWeights BoundWeights::snapshot(const std::vector<std::string>& names) const {
  if (weights_.device.type != DeviceType::cpu && !arrays_.empty()) {
    throw nb::value_error("snapshot: only host weights are copied here");
  }
  Weights names_checked;
  for (const std::string& name : names) {
    if (!weight_slot(names_checked, name)) {
      throw nb::value_error(("snapshot: no weight called '" + name + "'").c_str());
    }
  }
  // Built entry by entry rather than copied whole and patched: this runs in every forward call
  // of the layer, where copying the names and arrays twice costs more than the small kernels.
  BoundWeights copy;
  copy.weights_ = weights_;
  copy.features_ = features_;
  copy.copies_ = copies_;
  copy.arrays_.reserve(arrays_.size());
  const std::size_t bytes = static_cast<std::size_t>(features_) * dtype_size(weights_.dtype);
  const std::size_t stride = (bytes + 7) / 8;  // doubles per copied vector
  double* storage = nullptr;
  std::size_t used = 0;
  for (const auto& [name, array] : arrays_) {
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      copy.arrays_.emplace_back(name, array);
      continue;
    }
    if (!storage) {  // uninitialized: every copied byte is written next
      storage = new double[names.size() * stride];
      copy.copies_.emplace_back(storage);
    }
    void** slot = weight_slot(copy.weights_, name);
    if (bytes) std::memcpy(storage + used, *slot, bytes);  // (no vector: no pointer to copy)
    *slot = storage + used;
    used += stride;
    copy.arrays_.emplace_back(name, nb::none());
  }
  return copy;
}

bool BoundWeights::has(const std::string& name) const {
  // Bound under that name (an empty vector may have no data pointer, yet the weight exists).
  for (const auto& [bound, array] : arrays_) {
    if (bound == name) return true;
  }
  return false;
}

nb::object BoundWeights::vector(const std::string& name) const {
  for (const auto& [bound, array] : arrays_) {
    if (bound == name) return array;
  }
  return nb::none();
}

std::vector<std::string> BoundWeights::names() const {
  std::vector<std::string> result;
  for (const auto& [name, array] : arrays_) result.push_back(name);
  return result;
}

void bind_weights(nb::module_& m) {
  nb::class_<BoundWeights>(m, "Weights",
                           "A layer's weight vectors (Keras' names to contiguous 1-D arrays of one "
                           "dtype, device and length), checked once and read by many calls.")
      .def(nb::init<const nb::kwargs&>(), nb::arg("vectors"),
           nb::sig("def __init__(self, **vectors: object) -> None"))
      .def("snapshot", &BoundWeights::snapshot, nb::arg("names"),
           "These weights with the vectors called `names` copied (host weights only).")
      .def("has", &BoundWeights::has, nb::arg("name"), "Whether the weight `name` is present.")
      .def("vector", &BoundWeights::vector, nb::arg("name"),
           "The array bound as `name` (None where absent or copied by a snapshot).")
      .def_prop_ro("names", &BoundWeights::names, "The names bound, in the order given.")
      .def_prop_ro("features", &BoundWeights::features, "The length of every vector.")
      .def_prop_ro(
          "device",
          [](const BoundWeights& w) {
            return nb::make_tuple(static_cast<int>(w.device().type), w.device().index);
          },
          "Where the vectors live: (DLPack device type, index).")
      .def_prop_ro(
          "dtype", [](const BoundWeights& w) { return std::string(dtype_name(w.dtype())); },
          "The vectors' dtype name.");
}

}  // namespace batchnorm::python
