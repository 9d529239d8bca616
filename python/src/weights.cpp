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

int weight_slot_index(std::string_view name) {
  for (int i = 0; i < kWeightCount; ++i) {
    if (name == weight_name(i)) return i;
  }
  return -1;
}

static_assert(BoundWeights::kSlots == kWeightCount);

BoundWeights::BoundWeights(const nb::kwargs& vectors) {
  for (auto [key, value] : vectors) {
    const std::string name = nb::cast<std::string>(key);
    const int slot = weight_slot_index(name);
    if (slot < 0) throw nb::type_error(("unexpected keyword argument '" + name + "'").c_str());
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
    if (bound_ == 0) {
      weights_.dtype = t.dtype;
      weights_.device = t.device;
      features_ = length;
    } else if (t.dtype != weights_.dtype) {
      throw nb::type_error(message(name, std::string("dtype ") + dtype_name(t.dtype) +
                                             " differs from " + first_name() + "'s " +
                                             dtype_name(weights_.dtype))
                               .c_str());
    } else if (t.device.type != weights_.device.type || t.device.index != weights_.device.index) {
      throw nb::value_error(
          message(name, std::string("every weight must live on the same device as ") + first_name())
              .c_str());
    } else if (length != features_) {
      throw nb::value_error(message(name, std::to_string(length) + " values, but " + first_name() +
                                              " has " + std::to_string(features_))
                                .c_str());
    }
    if (!present(slot)) order_[bound_++] = static_cast<std::int8_t>(slot);
    *weight_slot(weights_, slot) = t.data;
    arrays_[slot] = nb::borrow(value);
  }
}

const char* BoundWeights::first_name() const { return weight_name(order_[0]); }

Weights BoundWeights::for_input(const TensorRef& x, std::int64_t features) const {
  if (bound_ == 0) {  // nothing bound: nothing to fit (the core says
    Weights none;     // which weights the operation needs)
    none.dtype = weight_dtype(x.dtype);
    none.device = x.device;
    return none;
  }
  const std::string name = first_name();
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

BoundWeights BoundWeights::snapshot(SlotMask slots) const {
  if (weights_.device.type != DeviceType::cpu && bound_ != 0) {
    throw nb::value_error("snapshot: only host weights are copied here");
  }
  BoundWeights copy(*this);
  copy.last_snapshot_ = nb::object();
  int copied = 0;
  for (int i = 0; i < kSlots; ++i) copied += (slots >> i & 1u) && present(i);
  if (copied == 0) return copy;
  // This runs in every forward call of the layer: one block for all copied vectors, written
  // whole next (so left uninitialized).
  const std::size_t bytes = static_cast<std::size_t>(features_) * dtype_size(weights_.dtype);
  const std::size_t stride = (bytes + 7) / 8;  // doubles per copied vector
  std::shared_ptr<double[]> block(new double[static_cast<std::size_t>(copied) * stride]);
  double* storage = block.get();
  for (int i = 0; i < kSlots; ++i) {
    if (!(slots >> i & 1u) || !present(i)) continue;
    void** slot = weight_slot(copy.weights_, i);
    if (bytes) std::memcpy(storage, *slot, bytes);  // (no vector: no pointer to copy)
    *slot = storage;
    storage += stride;
    copy.arrays_[i] = nb::object();
    copy.copies_[i] = block;
  }
  return copy;
}

nb::object BoundWeights::kept_snapshot(SlotMask slots) const {
  if (last_snapshot_.is_valid() && last_snapshot_slots_ == slots) {
    const BoundWeights& last = nb::cast<const BoundWeights&>(last_snapshot_);
    Weights kept = last.weights_, current = weights_;  // (weight_slot takes them writable)
    const std::size_t bytes = static_cast<std::size_t>(features_) * dtype_size(weights_.dtype);
    bool same = last.features_ == features_ && kept.dtype == current.dtype;
    for (int i = 0; same && i < kSlots; ++i) {
      if (!(slots >> i & 1u) || !present(i) || bytes == 0) continue;
      same = std::memcmp(*weight_slot(kept, i), *weight_slot(current, i), bytes) == 0;
    }
    if (same) return last_snapshot_;
  }
  last_snapshot_ = nb::cast(snapshot(slots));
  last_snapshot_slots_ = slots;
  return last_snapshot_;
}

BoundWeights BoundWeights::snapshot(const std::vector<std::string>& names) const {
  SlotMask slots = 0;
  for (const std::string& name : names) {
    const int slot = weight_slot_index(name);
    if (slot < 0) throw nb::value_error(("snapshot: no weight called '" + name + "'").c_str());
    slots |= 1u << slot;
  }
  return snapshot(slots);
}

bool BoundWeights::has(const std::string& name) const {
  // Bound under that name (an empty vector may have no data pointer, yet the weight exists).
  const int slot = weight_slot_index(name);
  return slot >= 0 && present(slot);
}

nb::object BoundWeights::vector(const std::string& name) const {
  const int slot = weight_slot_index(name);
  return slot >= 0 && arrays_[slot].is_valid() ? arrays_[slot] : nb::none();
}

std::vector<std::string> BoundWeights::names() const {
  std::vector<std::string> result;
  for (int i = 0; i < bound_; ++i) result.emplace_back(weight_name(order_[i]));
  return result;
}

void bind_weights(nb::module_& m) {
  nb::class_<BoundWeights>(m, "Weights",
                           "A layer's weight vectors (Keras' names to contiguous 1-D arrays of one "
                           "dtype, device and length), checked once and read by many calls.")
      .def(nb::init<const nb::kwargs&>(), nb::arg("vectors"),
           nb::sig("def __init__(self, **vectors: object) -> None"))
      .def("snapshot",
           nb::overload_cast<const std::vector<std::string>&>(&BoundWeights::snapshot, nb::const_),
           nb::arg("names"),
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
