// The element types of the data, listed once. A data type of the library is a storage type
// (core/half.hpp for the 16-bit ones), its DType enumerator and one line of
// BATCHNORM_ELEMENT_TYPES; what differs per type is made from this list: the dispatch from a
// run-time DType to its storage type, dtype_name and dtype_size, the weights' dtype, the
// backends' entry tables (core/backend.hpp) and the CPU kernel tables (cpu/dispatch.hpp).
#pragma once

#include <type_traits>

#include "batchnorm/batchnorm.hpp"
#include "core/half.hpp"

namespace batchnorm::detail {

// X(storage type, DType enumerator) for every element type the kernels take. The enumerator's
// name is the dtype's name (NumPy's spelling).
#define BATCHNORM_ELEMENT_TYPES(X) \
  X(float16, float16)              \
  X(bfloat16, bfloat16)            \
  X(float, float32)                \
  X(double, float64)

template <class... Ts>
struct TypeList {};

// A storage type and the DType that names it at run time.
template <class T, DType D>
struct Element {
  using type = T;
  static constexpr DType dtype = D;
};

template <class Ignored, class... Ts>
struct WithoutFirst {
  using type = TypeList<Ts...>;
};

// The list above as types (each entry brings its own leading comma, hence the void to drop).
#define BATCHNORM_ELEMENT_ENTRY(type, name) , Element<type, DType::name>
using Elements = WithoutFirst<void BATCHNORM_ELEMENT_TYPES(BATCHNORM_ELEMENT_ENTRY)>::type;
#undef BATCHNORM_ELEMENT_ENTRY

template <class T, class... Es>
constexpr DType find_dtype(TypeList<Es...>) {
  static_assert((std::is_same_v<T, typename Es::type> || ...), "not an element type");
  DType found{};
  ((std::is_same_v<T, typename Es::type> ? (found = Es::dtype, true) : false) || ...);
  return found;
}

// The DType of storage type T.
template <class T>
inline constexpr DType dtype_of = find_dtype<T>(Elements{});

template <class F, class... Es>
bool visit_element(DType dtype, F& f, TypeList<Es...>) {
  return ((dtype == Es::dtype ? (f(typename Es::type{}), true) : false) || ...);
}

// Calls f(T{}) with the storage type T of `dtype`. Returns false, calling nothing, for a dtype
// that is no element type (bool).
template <class F>
bool visit_element(DType dtype, F&& f) {
  return visit_element(dtype, f, Elements{});
}

template <class F, class... Es>
void for_each_element(F& f, TypeList<Es...>) {
  (f(typename Es::type{}), ...);
}

// Calls f(T{}) with every element type T, in the order of the list.
template <class F>
void for_each_element(F&& f) {
  for_each_element(f, Elements{});
}

}  // namespace batchnorm::detail
