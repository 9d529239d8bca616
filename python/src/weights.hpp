// A layer's weight vectors bound once for many calls: each array is checked (a contiguous 1-D
// vector; one dtype, one device and one length for all) and its name resolved to the kernels'
// pointer when it is bound, not on every call.
#pragma once

#include <nanobind/nanobind.h>

#include <array>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "tensors.hpp"

namespace batchnorm::python {

class BoundWeights {
 public:
  // The weights in the order of Weights' members; a set of them is a bit mask over this order.
  static constexpr int kSlots = 7;
  using SlotMask = unsigned;

  // Keras' weight names to arrays (None, or left out, where the layer has no such weight).
  explicit BoundWeights(const nb::kwargs& vectors);

  // The pointers for a call on input `x` with `features` features, after checking that the
  // vectors fit it: the dtype x computes in, x's device, one value per feature.
  Weights for_input(const TensorRef& x, std::int64_t features) const;

  // A copy in which the vectors of `slots` are this object's own copies (host memory only), the
  // others shared: what a backward keeps of its forward call's weights.
  BoundWeights snapshot(SlotMask slots) const;
  // The same by Keras' names (ValueError for a name that is no weight).
  BoundWeights snapshot(const std::vector<std::string>& names) const;
  // snapshot(slots) as a Python Weights object: the one this object made last, for the same
  // slots, while each vector it copied still holds the same bytes here (a loop of inference
  // calls copies nothing), else a new one that replaces it. Snapshots are never written, so
  // calls may share one. Called with the GIL held (it serializes the calls that update it).
  nb::object kept_snapshot(SlotMask slots) const;

  bool has(const std::string& name) const;
  // The array bound under `name`; None where absent or copied by a snapshot.
  nb::object vector(const std::string& name) const;
  std::vector<std::string> names() const;
  std::int64_t features() const { return features_; }
  DType dtype() const { return weights_.dtype; }
  const Device& device() const { return weights_.device; }

 private:
  BoundWeights() = default;
  bool present(int slot) const { return arrays_[slot].is_valid() || copies_[slot] != nullptr; }
  const char* first_name() const;

  Weights weights_;
  std::int64_t features_ = 0;
  // Per slot, what keeps its vector alive: the bound array, or the block a snapshot copied it
  // into (shared with this object's copies and with snapshots of it); neither where absent.
  std::array<nb::object, kSlots> arrays_;
  std::array<std::shared_ptr<const double[]>, kSlots> copies_;
  // The slots in the order they were bound (names() and error messages name them so).
  std::array<std::int8_t, kSlots> order_{};
  int bound_ = 0;
  // kept_snapshot's last result and its slots (none in a snapshot: no chain of them).
  mutable nb::object last_snapshot_;
  mutable SlotMask last_snapshot_slots_ = 0;
};

// The slot of the weight called `name`, or -1 for a name that is no weight.
int weight_slot_index(std::string_view name);

void bind_weights(nb::module_& m);

}  // namespace batchnorm::python
