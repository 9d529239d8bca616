// The interface every backend implements: the four layer operations on typed pointers and
// precomputed Plans. batchnorm.cpp validates the arguments, builds the plans and picks the
// backend and element type in one place; backends hold no argument checks of their own.
#pragma once

#include <cstdint>

#include "batchnorm/batchnorm.hpp"
#include "core/half.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"

namespace batchnorm::detail {

// Operand order of each plan: stats (x, mask), apply (x, y), sums (dy, x), dx (dy, x, dx, mask).
#define BATCHNORM_BACKEND_OPERATIONS                                                              \
  template <class T>                                                                              \
  static void train_forward(const Plan& stats_plan, const Plan& apply_plan, const T* x, T* y,     \
                            const std::uint8_t* mask, const TrainScalars& scalars,                \
                            const WeightPtrs<compute_t<T>>& weights, TrainingContext& context,    \
                            const Communicator* communicator);                                    \
  template <class T>                                                                              \
  static void infer_forward(const Plan& plan, const T* x, T* y, double epsilon,                   \
                            const WeightPtrs<compute_t<T>>& weights);                             \
  template <class T>                                                                              \
  static void train_backward(const Plan& sums_plan, const Plan& dx_plan, const T* dy, const T* x, \
                             T* dx, const std::uint8_t* mask,                                     \
                             const WeightPtrs<compute_t<T>>& weights,                             \
                             const TrainingContext& context, compute_t<T>* dgamma,                \
                             compute_t<T>* dbeta, const Communicator* communicator);              \
  template <class T>                                                                              \
  static void infer_backward(const Plan& sums_plan, const Plan& dx_plan, const T* dy, const T* x, \
                             T* dx, double epsilon, const WeightPtrs<compute_t<T>>& weights,      \
                             compute_t<T>* dgamma, compute_t<T>* dbeta);

struct CpuBackend {
  BATCHNORM_BACKEND_OPERATIONS
};

// Compiled from cuda/*.cu when the build has CUDA, else from cuda/unavailable.cpp (throws).
struct CudaBackend {
  static bool available();
  BATCHNORM_BACKEND_OPERATIONS
};

// Explicit instantiation of a backend's operations for every element type (in its .cpp/.cu).
#define BATCHNORM_INSTANTIATE_OPERATIONS(Backend, T)                                               \
  template void Backend::train_forward<T>(                                                         \
      const Plan&, const Plan&, const T*, T*, const std::uint8_t*, const TrainScalars&,            \
      const WeightPtrs<compute_t<T>>&, TrainingContext&, const Communicator*);                     \
  template void Backend::infer_forward<T>(const Plan&, const T*, T*, double,                       \
                                          const WeightPtrs<compute_t<T>>&);                        \
  template void Backend::train_backward<T>(const Plan&, const Plan&, const T*, const T*, T*,       \
                                           const std::uint8_t*, const WeightPtrs<compute_t<T>>&,   \
                                           const TrainingContext&, compute_t<T>*, compute_t<T>*,   \
                                           const Communicator*);                                   \
  template void Backend::infer_backward<T>(const Plan&, const Plan&, const T*, const T*, T*,       \
                                           double, const WeightPtrs<compute_t<T>>&, compute_t<T>*, \
                                           compute_t<T>*);

#define BATCHNORM_INSTANTIATE_BACKEND(Backend)       \
  BATCHNORM_INSTANTIATE_OPERATIONS(Backend, float)   \
  BATCHNORM_INSTANTIATE_OPERATIONS(Backend, double)  \
  BATCHNORM_INSTANTIATE_OPERATIONS(Backend, float16) \
  BATCHNORM_INSTANTIATE_OPERATIONS(Backend, bfloat16)

}  // namespace batchnorm::detail
