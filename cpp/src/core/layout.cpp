// Builds the canonical loop nests of core/layout.hpp from strided operands.
#include "core/layout.hpp"

#include <algorithm>
#include <cstdlib>

namespace batchnorm::detail {

namespace {

// Folds runs of dims that are contiguous together in every operand: keeps the row-major index
// over the nest (so statistic numbering survives) and leaves fewer, longer loops.
void merge_contiguous(LoopNest& nest, int operands) {
  int out = 0;
  for (int i = 0; i < nest.count; ++i) {
    const LoopDim& d = nest.dims[i];
    if (d.size == 1) continue;
    if (out > 0) {
      LoopDim& outer = nest.dims[out - 1];
      bool mergeable = true;
      for (int op = 0; op < operands; ++op) {
        mergeable = mergeable && outer.stride[op] == d.stride[op] * d.size;
      }
      if (mergeable) {
        outer.size *= d.size;
        for (int op = 0; op < operands; ++op) outer.stride[op] = d.stride[op];
        continue;
      }
    }
    nest.dims[out++] = d;
  }
  nest.count = out;
  if (nest.count == 0) nest.dims[nest.count++] = LoopDim{};  // a single element, stride 0
}

// A nest with an empty dim has no elements at all. It becomes one empty dim: the kernels turn
// linear indices into multi-indices with a modulo by each dim's size, which an empty dim among
// others would turn into a division by zero.
void collapse_empty(LoopNest& nest) {
  if (nest.total() != 0) return;
  nest.count = 1;
  nest.dims[0] = LoopDim{};
  nest.dims[0].size = 0;
}

}  // namespace

Plan make_plan(const TensorRef& shape_source, std::uint32_t feature_axes, std::int64_t groups,
               const TensorRef* const* operands, int operand_count, int mask_operand) {
  Plan plan;
  plan.operands = operand_count;
  plan.groups = groups;
  LoopNest features;
  auto dim_of = [&](int axis, std::int64_t size, std::int64_t stride_factor) {
    LoopDim d;
    d.size = size;
    for (int op = 0; op < operand_count; ++op) {
      d.stride[op] = operands[op]->strides[axis] * stride_factor;
    }
    return d;
  };
  for (int axis = 0; axis < shape_source.rank; ++axis) {
    const std::int64_t size = shape_source.shape[axis];
    if (feature_axes & (1u << axis)) {
      features.dims[features.count++] = dim_of(axis, size, 1);
      plan.features *= size;
    } else if (axis == 0 && groups > 1) {
      // Keras reshapes the batch to (V, G, ...): sample i belongs to ghost group i % G.
      plan.stat.dims[plan.stat.count++] = dim_of(axis, groups, 1);
      plan.reduced.dims[plan.reduced.count++] = dim_of(axis, size / groups, groups);
    } else {
      plan.reduced.dims[plan.reduced.count++] = dim_of(axis, size, 1);
    }
  }
  for (int i = 0; i < features.count; ++i) plan.stat.dims[plan.stat.count++] = features.dims[i];

  // Reduction order is free: put the smallest stride of the first operand innermost.
  std::stable_sort(plan.reduced.dims, plan.reduced.dims + plan.reduced.count,
                   [](const LoopDim& a, const LoopDim& b) {
                     return std::llabs(a.stride[0]) > std::llabs(b.stride[0]);
                   });
  merge_contiguous(plan.stat, operand_count);
  merge_contiguous(plan.reduced, operand_count);
  collapse_empty(plan.stat);
  collapse_empty(plan.reduced);

  const LoopDim& inner = plan.stat.dims[plan.stat.count - 1];
  plan.row = inner.size > 1;
  for (int op = 0; op < operand_count; ++op) {
    plan.row = plan.row && inner.stride[op] == (op == mask_operand ? 0 : 1);
  }
  return plan;
}

}  // namespace batchnorm::detail
