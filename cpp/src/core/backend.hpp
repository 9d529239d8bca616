// The one interface between the core and its backends. The core (core/batchnorm.cpp) checks a
// call, builds its plans and hands the backend of the data's device one descriptor holding all
// the operation needs: each descriptor below is the only place where an operation's arguments
// are written down. Backends hold no argument checks of their own.
#pragma once

#include <cstdint>
#include <tuple>

#include "batchnorm/batchnorm.hpp"
#include "core/elements.hpp"
#include "core/half.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"

namespace batchnorm::detail {

// Training forward: statistics, output and (scalars.update_moving) the moving-statistics
// update in `weights`, which carry the adjustment too.
template <class T>
struct TrainForward {
  Plan stats_plan;  // operands: x, mask
  Plan apply_plan;  // operands: x, y
  const T* x;
  T* y;
  const std::uint8_t* mask;  // null without a mask
  TrainScalars scalars;
  WeightPtrs<compute_t<T>> weights;
  TrainingContext& context;          // out: what the backward pass needs
  const Communicator* communicator;  // null or of size 1: nothing to synchronize
};

template <class T>
struct InferForward {
  Plan plan;  // operands: x, y
  const T* x;
  T* y;
  double epsilon;
  WeightPtrs<compute_t<T>> weights;
};

template <class T>
struct TrainBackward {
  Plan sums_plan;  // operands: dy, x
  Plan dx_plan;    // operands: dy, x, dx, mask
  const T* dy;
  const T* x;
  T* dx;
  const std::uint8_t* mask;
  WeightPtrs<compute_t<T>> weights;
  const TrainingContext& context;
  compute_t<T>* dgamma;  // nullable
  compute_t<T>* dbeta;   // nullable
  const Communicator* communicator;
};

template <class T>
struct InferBackward {
  Plan sums_plan;  // operands: dy, x
  Plan dx_plan;    // operands: dy, x, dx
  const T* dy;
  const T* x;
  T* dx;
  double epsilon;
  WeightPtrs<compute_t<T>> weights;
  compute_t<T>* dgamma;  // nullable
  compute_t<T>* dbeta;   // nullable
};

// The operations on data of element type T: what every backend runs.
template <class T>
using Operations = TypeList<TrainForward<T>, InferForward<T>, TrainBackward<T>, InferBackward<T>>;

// The concatenation of type lists.
template <class... Lists>
struct Concat;
template <class... Ts>
struct Concat<TypeList<Ts...>> {
  using type = TypeList<Ts...>;
};
template <class... Ts, class... Us, class... Rest>
struct Concat<TypeList<Ts...>, TypeList<Us...>, Rest...> : Concat<TypeList<Ts..., Us...>, Rest...> {
};

// Every operation of every element type, as one list (a declaration for decltype only).
template <class... Es>
typename Concat<Operations<typename Es::type>...>::type every_operation(TypeList<Es...>);

// A backend as the core calls it: an entry point for every operation of every element type.
// The table is made in the backend's own sources (`of`), so the operations' templates are
// instantiated there, from the element list, and no other source needs their definitions.
class Backend {
  template <class Call>
  using Entry = void (*)(const Call&);
  template <class List>
  struct Table;
  template <class... Calls>
  struct Table<TypeList<Calls...>> {
    using type = std::tuple<Entry<Calls>...>;
  };
  using Calls = decltype(every_operation(Elements{}));
  using Entries = typename Table<Calls>::type;

 public:
  // `Impl` has `static bool available()` (whether the backend can run in this process) and a
  // static `run` taking each descriptor (overloads, or one template for all of them).
  template <class Impl>
  static constexpr Backend of() {
    return Backend(&Impl::available, entries<Impl>(Calls{}));
  }

  bool available() const { return available_(); }

  template <class Call>
  void run(const Call& call) const {
    std::get<Entry<Call>>(entries_)(call);
  }

 private:
  constexpr Backend(bool (*available)(), Entries entries)
      : available_(available), entries_(entries) {}

  template <class Impl, class... Cs>
  static constexpr Entries entries(TypeList<Cs...>) {
    return Entries(static_cast<Entry<Cs>>(&Impl::run)...);
  }

  bool (*available_)();
  Entries entries_;
};

// The backends, one folder each: cpu/ and cuda/ (cuda/unavailable.cpp in builds without CUDA).
const Backend& cpu_backend();
const Backend& cuda_backend();

}  // namespace batchnorm::detail
