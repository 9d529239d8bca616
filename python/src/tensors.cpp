// ndarray -> TensorRef conversion: dtype/device mapping and the zero-copy checks.
#include "tensors.hpp"

#include <cstdint>
#include <string>

namespace batchnorm::python {

namespace {

using Code = nb::dlpack::dtype_code;

// How DLPack names each DType: the binding's one dtype table (a new dtype is one line here).
struct DlpackType {
  DType dtype;
  Code code;
  std::uint8_t bits;
};
constexpr DlpackType kDlpackTypes[] = {
    {DType::float16, Code::Float, 16}, {DType::bfloat16, Code::Bfloat, 16},
    {DType::float32, Code::Float, 32}, {DType::float64, Code::Float, 64},
    {DType::boolean, Code::Bool, 8},
};

DType dtype_of(const nb::dlpack::dtype& dt, const char* name) {
  if (dt.lanes == 1) {
    for (const DlpackType& t : kDlpackTypes) {
      if (static_cast<Code>(dt.code) == t.code && dt.bits == t.bits) return t.dtype;
    }
    // NumPy has no bfloat16: ml_dtypes arrays arrive viewed as uint16 (see tensors.hpp).
    if (static_cast<Code>(dt.code) == Code::UInt && dt.bits == 16) return DType::bfloat16;
  }
  throw nb::type_error((std::string(name) + ": unsupported element type (code " +
                        std::to_string(dt.code) + ", " + std::to_string(dt.bits) +
                        " bits); expected float16, bfloat16, float32 or float64")
                           .c_str());
}

}  // namespace

nb::dlpack::dtype dlpack_dtype(const std::string& name) {
  for (const DlpackType& t : kDlpackTypes) {
    if (name == dtype_name(t.dtype)) return {static_cast<std::uint8_t>(t.code), t.bits, 1};
  }
  throw nb::type_error(("unsupported dtype " + name).c_str());
}

namespace {

// DeviceType uses DLPack's codes: the core says whether it has a backend for the device.
static_assert(static_cast<int>(DeviceType::cpu) == nb::device::cpu::value);
static_assert(static_cast<int>(DeviceType::cuda) == nb::device::cuda::value);
Device device_of(int type, int id) {
  return Device{static_cast<DeviceType>(type), type == nb::device::cpu::value ? 0 : id};
}

// Masks are checked by the caller; their element type is fixed to boolean here.
enum class Kind { data, mask };

template <class Array>
TensorRef convert(const Array& a, const char* name, Kind kind = Kind::data) {
  if (a.ndim() > static_cast<std::size_t>(kMaxRank)) {
    throw nb::value_error((std::string(name) + ": rank " + std::to_string(a.ndim()) +
                           " exceeds the supported maximum of " + std::to_string(kMaxRank))
                              .c_str());
  }
  TensorRef t;
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  t.dtype = kind == Kind::mask ? DType::boolean : dtype_of(a.dtype(), name);
  t.rank = static_cast<int>(a.ndim());
  for (int i = 0; i < t.rank; ++i) {
    t.shape[i] = static_cast<std::int64_t>(a.shape(i));
    t.strides[i] = a.stride(i);
  }
  t.device = device_of(a.device_type(), a.device_id());
  return t;
}

}  // namespace

namespace {

// The element types NumPy's buffer protocol names with one struct character (native byte order).
DType buffer_dtype(const char* format, bool* known) {
  if (*format == '@' || *format == '=' || *format == '<')
    ++format;  // ('<': the hosts built for are little-endian)
  *known = format[0] != '\0' && format[1] == '\0';
  switch (*known ? format[0] : '\0') {
    case 'e':
      return DType::float16;
    case 'f':
      return DType::float32;
    case 'd':
      return DType::float64;
    case 'H':  // ml_dtypes' bfloat16 viewed as uint16 (see tensors.hpp)
      return DType::bfloat16;
    default:
      *known = false;
      return DType::float32;
  }
}

PyTypeObject* numpy_array_type() {
  static PyTypeObject* const type = reinterpret_cast<PyTypeObject*>(
      nb::object(nb::module_::import_("numpy").attr("ndarray")).release().ptr());
  return type;
}

}  // namespace

ArrayArgument::ArrayArgument(nb::handle object, const char* name, Access access) {
  if (Py_TYPE(object.ptr()) == numpy_array_type() && read_buffer(object, access)) return;
  if (access == Access::write) {
    if (!nb::try_cast(object, output_)) {
      throw nb::type_error(
          (std::string(name) + ": expected a writable array (NumPy or DLPack)").c_str());
    }
    tensor_ = convert(output_, name);
  } else {
    if (!nb::try_cast(object, input_)) {
      throw nb::type_error((std::string(name) + ": expected an array (NumPy or DLPack)").c_str());
    }
    tensor_ = convert(input_, name);
  }
}

ArrayArgument::ArrayArgument(nb::handle object, Access access) {
  if (Py_TYPE(object.ptr()) != numpy_array_type() || !read_buffer(object, access)) return;
  const std::size_t size = dtype_size(tensor_.dtype);
  const bool aligned = reinterpret_cast<std::uintptr_t>(tensor_.data) % size == 0;
  if (tensor_.dtype == DType::bfloat16 || !aligned) {  // (bfloat16: a uint16 NumPy array)
    PyBuffer_Release(&buffer_);
    holds_buffer_ = false;
  }
}

bool ArrayArgument::read_buffer(nb::handle object, Access access) {
  const int flags = PyBUF_RECORDS_RO | (access == Access::write ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(object.ptr(), &buffer_, flags) != 0) {
    PyErr_Clear();  // the DLPack import decides, and words the error if there is one
    return false;
  }
  bool known = false;
  const DType dtype = buffer_dtype(buffer_.format, &known);
  bool described = known && buffer_.ndim <= kMaxRank;
  for (int i = 0; described && i < buffer_.ndim; ++i) {
    described = buffer_.strides[i] % buffer_.itemsize == 0;
  }
  if (!described) {
    PyBuffer_Release(&buffer_);
    return false;
  }
  holds_buffer_ = true;
  tensor_.data = buffer_.buf;
  tensor_.dtype = dtype;
  tensor_.rank = buffer_.ndim;
  for (int i = 0; i < buffer_.ndim; ++i) {
    tensor_.shape[i] = buffer_.shape[i];
    tensor_.strides[i] = buffer_.strides[i] / buffer_.itemsize;
  }
  tensor_.device = Device{DeviceType::cpu, 0};
  return true;
}

ArrayArgument::~ArrayArgument() {
  if (holds_buffer_) PyBuffer_Release(&buffer_);
}

TensorRef to_tensor(const OutputArray& array, const char* name) { return convert(array, name); }

TensorRef to_mask(const InputArray& array) {
  const auto dt = array.dtype();
  if (dt.bits == 8 && dt.lanes == 1 &&
      (dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bool) ||
       dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::UInt))) {
    return convert(array, "mask", Kind::mask);
  }
  throw nb::type_error("mask: expected bool or uint8 (0/1) elements");
}

void* weight_pointer(const nb::handle& handle, std::int64_t n, DType dtype, const Device& device,
                     const char* name) {
  if (handle.is_none()) return nullptr;
  // The caller holds the array for the call: its data outlives the argument's read.
  const TensorRef t = ArrayArgument(handle, name, ArrayArgument::Access::write).tensor();
  if (t.rank != 1 || t.shape[0] != n || (n > 1 && t.strides[0] != 1)) {
    throw nb::value_error(
        (std::string(name) + ": expected a contiguous vector of " + std::to_string(n) + " elements")
            .c_str());
  }
  if (t.dtype != dtype) {
    throw nb::type_error((std::string(name) + ": expected dtype " + dtype_name(dtype) + ", got " +
                          dtype_name(t.dtype))
                             .c_str());
  }
  if (t.device.type != device.type || t.device.index != device.index) {
    throw nb::value_error(
        (std::string(name) + ": weights must live on the same device as the input").c_str());
  }
  return t.data;
}

}  // namespace batchnorm::python
