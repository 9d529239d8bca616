// A layer's weight vectors bound once for many calls: each array is checked (a contiguous 1-D
// vector; one dtype, one device and one length for all) and its name resolved to the kernels'
// pointer when it is bound, not on every call.
#pragma once

#include <nanobind/nanobind.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "tensors.hpp"

namespace batchnorm::python {

class BoundWeights {
 public:
  // Keras' weight names to arrays (None, or left out, where the layer has no such weight).
  explicit BoundWeights(const nb::kwargs& vectors);

  // The pointers for a call on input `x` with `features` features, after checking that the
  // vectors fit it: the dtype x computes in, x's device, one value per feature.
  Weights for_input(const TensorRef& x, std::int64_t features) const;

  // A copy in which the vectors called `names` are this object's own copies (host memory only),
  // the others shared: what a backward keeps of its forward call's weights.
  BoundWeights snapshot(const std::vector<std::string>& names) const;

  bool has(const std::string& name) const;
  // The array bound under `name`; None where absent or copied by a snapshot.
  nb::object vector(const std::string& name) const;
  std::vector<std::string> names() const;
  std::int64_t features() const { return features_; }
  DType dtype() const { return weights_.dtype; }
  const Device& device() const { return weights_.device; }

 private:
  BoundWeights() = default;

  Weights weights_;
  std::int64_t features_ = 0;
  std::vector<std::pair<std::string, nb::object>> arrays_;  // keeps the bound arrays alive
  // The blocks a snapshot's copied vectors live in, shared with its copies and with snapshots
  // of it (whose vectors not copied again still point into them).
  std::vector<std::shared_ptr<const double[]>> copies_;
};

void bind_weights(nb::module_& m);

}  // namespace batchnorm::python
