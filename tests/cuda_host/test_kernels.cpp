// The CUDA backend's kernels, launchers and operations, compiled for the host with the CUDA
// emulation of include/cuda_runtime.h, against the CPU backend on the same data: every layout
// kind (row and plane mode, vector and scalar loads, general strided nests), dtype, mode
// (training with masks, ghost batches, renorm and adjustment; inference; both backward passes),
// outputs pre-filled with NaN (an element the kernels do not write shows, and so does a write
// outside the output's view), strided, expanded, misaligned, channels-last and empty inputs,
// more than 32 chunks per statistic, and communicators of 2 and 3 ranks (one thread each); and
// training and inference steps captured as CUDA graphs, with nothing a capture forbids.
// Prints one line per failure and a summary; exits non-zero on any failure.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "core/half.hpp"
#include "cuda/runtime.hpp"

namespace {

using batchnorm::Device;
using batchnorm::DeviceType;
using batchnorm::DType;
using batchnorm::Options;
using batchnorm::TensorRef;

int failures = 0;
int checks = 0;

void fail(const std::string& what) {
  ++failures;
  if (failures <= 40) std::printf("FAIL %s\n", what.c_str());
}

constexpr Device kCpu{DeviceType::cpu, 0};
constexpr Device kCuda{DeviceType::cuda, 0};

// Memory of a device, filled with NaN bytes: the emulated device's own allocation, or host
// memory for the CPU backend.
class Buffer {
 public:
  Buffer(std::size_t bytes, Device device) : bytes_(bytes), device_(device) {
    if (device.type == DeviceType::cuda) {
      if (cudaMalloc(&data_, bytes) != cudaSuccess) throw std::bad_alloc();
    } else {
      data_ = std::aligned_alloc(256, (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256);
      std::memset(data_, 0xff, bytes);
    }
  }
  ~Buffer() {
    if (device_.type == DeviceType::cuda) {
      cudaFree(data_);
    } else {
      std::free(data_);
    }
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  char* data() const { return static_cast<char*>(data_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_;
  Device device_;
};

// How an array of a logical shape lies in memory.
struct View {
  std::vector<int> order;   // axes from the outermost in memory; empty: C order
  int step_axis = -1;       // this axis steps 2 elements (a [::2] slice)
  int expand_axis = -1;     // this axis has stride 0 (an expanded array)
  std::int64_t offset = 0;  // elements before the first one (1: not aligned for vectors)
};

std::size_t dtype_bytes(DType d) { return batchnorm::dtype_size(d); }

double read_value(const char* at, DType d) {
  switch (d) {
    case DType::float16: {
      batchnorm::detail::float16 h;
      std::memcpy(&h, at, 2);
      return batchnorm::detail::to_float(h);
    }
    case DType::bfloat16: {
      batchnorm::detail::bfloat16 b;
      std::memcpy(&b, at, 2);
      return batchnorm::detail::to_float(b);
    }
    case DType::float32: {
      float f;
      std::memcpy(&f, at, 4);
      return f;
    }
    case DType::float64: {
      double v;
      std::memcpy(&v, at, 8);
      return v;
    }
    case DType::boolean:
      return *at ? 1.0 : 0.0;
  }
  return 0.0;
}

void write_value(char* at, DType d, double value) {
  switch (d) {
    case DType::float16: {
      const auto h = batchnorm::detail::to_float16(static_cast<float>(value));
      std::memcpy(at, &h, 2);
      return;
    }
    case DType::bfloat16: {
      const auto b = batchnorm::detail::to_bfloat16(static_cast<float>(value));
      std::memcpy(at, &b, 2);
      return;
    }
    case DType::float32: {
      const auto f = static_cast<float>(value);
      std::memcpy(at, &f, 4);
      return;
    }
    case DType::float64:
      std::memcpy(at, &value, 8);
      return;
    case DType::boolean:
      *at = value != 0.0;
      return;
  }
}

// An array in a Buffer, seen through a TensorRef.
struct Array {
  std::unique_ptr<Buffer> buffer;
  TensorRef ref;
  std::int64_t span = 0;  // elements from the view's start to the end of the buffer

  // Storage offsets of every logical element, in row-major order.
  std::vector<std::int64_t> offsets() const {
    std::vector<std::int64_t> out;
    const std::int64_t n = ref.numel();
    out.reserve(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      std::int64_t rest = i, at = 0;
      for (int a = ref.rank - 1; a >= 0; --a) {
        at += (rest % ref.shape[a]) * ref.strides[a];
        rest /= ref.shape[a];
      }
      out.push_back(at);
    }
    return out;
  }

  std::vector<double> values() const {
    std::vector<double> out;
    const char* base = static_cast<const char*>(ref.data);
    for (std::int64_t at : offsets()) {
      out.push_back(read_value(base + at * dtype_bytes(ref.dtype), ref.dtype));
    }
    return out;
  }

  // Whether every byte of the buffer outside the view still holds the NaN fill.
  bool untouched_outside() const {
    const std::size_t size = dtype_bytes(ref.dtype);
    std::vector<bool> inside(static_cast<std::size_t>(span), false);
    for (std::int64_t at : offsets()) inside[static_cast<std::size_t>(at)] = true;
    const char* base = static_cast<const char*>(ref.data);
    for (std::int64_t e = 0; e < span; ++e) {
      if (inside[static_cast<std::size_t>(e)]) continue;
      for (std::size_t b = 0; b < size; ++b) {
        if (static_cast<unsigned char>(base[e * static_cast<std::int64_t>(size) + b]) != 0xff) {
          return false;
        }
      }
    }
    return true;
  }
};

Array make_array(const std::vector<std::int64_t>& shape, DType dtype, const View& view,
                 Device device) {
  const int rank = static_cast<int>(shape.size());
  std::vector<int> order = view.order;
  if (order.empty()) {
    for (int a = 0; a < rank; ++a) order.push_back(a);
  }
  Array array;
  array.ref.dtype = dtype;
  array.ref.rank = rank;
  array.ref.device = device;
  std::int64_t running = 1;
  for (int i = rank - 1; i >= 0; --i) {
    const int a = order[static_cast<std::size_t>(i)];
    array.ref.shape[a] = shape[static_cast<std::size_t>(a)];
    if (a == view.expand_axis) {
      array.ref.strides[a] = 0;
      continue;
    }
    const std::int64_t step = a == view.step_axis ? 2 : 1;
    array.ref.strides[a] = running * step;
    running *= std::max<std::int64_t>(shape[static_cast<std::size_t>(a)], 1) * step;
  }
  array.span = running;
  const std::size_t bytes = static_cast<std::size_t>(view.offset + running) * dtype_bytes(dtype);
  array.buffer = std::make_unique<Buffer>(bytes, device);
  array.ref.data = array.buffer->data() + view.offset * dtype_bytes(dtype);
  return array;
}

// Fills the view's elements in row-major order (an expanded axis keeps the last value written).
void fill(Array& array, const std::vector<double>& values) {
  char* base = static_cast<char*>(array.ref.data);
  const auto offsets = array.offsets();
  for (std::size_t i = 0; i < offsets.size(); ++i) {
    write_value(base + offsets[i] * dtype_bytes(array.ref.dtype), array.ref.dtype, values[i]);
  }
}

std::vector<double> random_values(std::size_t n, unsigned seed, double mean, double spread) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<double> normal(mean, spread);
  std::vector<double> out(n);
  for (double& v : out) v = normal(engine);
  return out;
}

enum class Mask { none, per_row, per_position };

struct Case {
  std::string name;
  std::vector<std::int64_t> shape;
  Options options;
  View x_view;
  Mask mask = Mask::none;
  bool adjustment = false;
  int ranks = 1;
};

// Everything a call sequence produces, by name, for the comparison.
struct Results {
  std::vector<std::pair<std::string, std::vector<double>>> values;
  std::vector<std::string> problems;  // writes outside outputs' views
  void add(const std::string& name, std::vector<double> v) {
    values.emplace_back(name, std::move(v));
  }
};

struct Communication {
  int size;
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::vector<double>> slots;
  int arrived = 0, left = 0;
  std::uint64_t generation = 0;

  explicit Communication(int n) : size(n), slots(static_cast<std::size_t>(n)) {}

  // Every rank's `count` values, in rank order, once all ranks have sent theirs.
  void allgather(int rank, const double* send, double* receive, std::size_t count) {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return left == 0; });
    slots[static_cast<std::size_t>(rank)].assign(send, send + count);
    const std::uint64_t mine = generation;
    if (++arrived == size) {
      ++generation;
      left = size;
      changed.notify_all();
    } else {
      changed.wait(lock, [&] { return generation != mine; });
    }
    for (int r = 0; r < size; ++r) {
      std::copy(slots[static_cast<std::size_t>(r)].begin(),
                slots[static_cast<std::size_t>(r)].end(),
                receive + static_cast<std::size_t>(r) * count);
    }
    if (--left == 0) {
      arrived = 0;
      changed.notify_all();
    }
  }
};

// Captures the calls made in its scope as a CUDA graph on a stream of its own (the emulation
// checks every call against what a capture allows); `problems` gets what made it fail.
class CaptureScope {
 public:
  explicit CaptureScope(std::vector<std::string>& problems) : problems_(problems) {
    cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
    batchnorm::set_cuda_stream(stream_);
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal) != cudaSuccess) {
      problems_.push_back("the capture did not begin");
    }
  }
  ~CaptureScope() {
    end();
    batchnorm::set_cuda_stream(nullptr);
    cudaStreamDestroy(stream_);
  }
  CaptureScope(const CaptureScope&) = delete;
  CaptureScope& operator=(const CaptureScope&) = delete;

  void end() {
    if (ended_) return;
    ended_ = true;
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream_, &graph) != cudaSuccess || !graph) {
      problems_.push_back("the capture failed");
    }
    cudaGetLastError();
    for (const std::string& v : cuda_host::capture_violations()) {
      problems_.push_back("illegal in a capture: " + v);
    }
  }

 private:
  std::vector<std::string>& problems_;
  cudaStream_t stream_ = nullptr;
  bool ended_ = false;
};

// A training context whose statistics live in `storage` (the caller's memory, as a framework's
// tensor would hold them).
void use_storage(batchnorm::TrainingContext& context, std::unique_ptr<Buffer>& storage,
                 const Case& c, std::int64_t features) {
  const std::int64_t batch = c.shape.empty() ? 1 : c.shape[0];
  const std::int64_t size = c.options.virtual_batch_size;
  const std::int64_t groups = size > 0 && batch > 0 ? batch / size : 1;
  const auto doubles = static_cast<std::size_t>(3 * groups * features + 2 * features);
  storage = std::make_unique<Buffer>(doubles * sizeof(double), kCuda);
  context.device_storage = reinterpret_cast<double*>(storage->data());
  context.device_storage_size = doubles;
}

// How a step runs: uncaptured, or inside a graph capture with the training statistics in
// memory of the caller's, the backward taking the forward's context or one rebuilt from that
// memory (as the torch.compile route does).
enum class Capture { none, context, rebuilt };

Results run_rank(const Case& c, DType dtype, bool training, Device device, int rank,
                 Communication* communication, Capture capture = Capture::none) {
  Results results;
  const DType wtype = batchnorm::weight_dtype(dtype);
  const auto schema = batchnorm::weight_schema(c.options, c.shape);
  const std::int64_t features = schema.features;
  const auto n = static_cast<std::size_t>(
      std::accumulate(c.shape.begin(), c.shape.end(), std::int64_t{1}, std::multiplies<>()));

  Array x = make_array(c.shape, dtype, c.x_view, device);
  fill(x, random_values(n, 11u + static_cast<unsigned>(rank), 3.0, 2.0));
  View out_view = c.x_view;
  out_view.expand_axis = -1;  // outputs never alias themselves
  Array y = make_array(c.shape, dtype, out_view, device);
  Array dy = make_array(c.shape, dtype, out_view, device);
  fill(dy, random_values(n, 31u + static_cast<unsigned>(rank), 0.0, 1.0));
  Array dx = make_array(c.shape, dtype, out_view, device);

  // Masks broadcast with stride 0: over the features (per_row, Keras' form) or over axis 1.
  std::unique_ptr<Array> mask;
  if (c.mask != Mask::none) {
    View mask_view;
    mask_view.expand_axis = c.mask == Mask::per_row ? static_cast<int>(c.shape.size()) - 1 : 1;
    mask = std::make_unique<Array>(make_array(c.shape, DType::boolean, mask_view, device));
    std::mt19937_64 engine(71u + static_cast<unsigned>(rank));
    std::vector<double> bits(n);
    for (double& b : bits) b = (engine() % 10) < 7 ? 1.0 : 0.0;
    // The first sample has no valid position: a ghost group may be empty.
    const std::size_t per_sample = c.shape[0] > 0 ? n / static_cast<std::size_t>(c.shape[0]) : 0;
    std::fill(bits.begin(), bits.begin() + static_cast<std::ptrdiff_t>(per_sample), 0.0);
    fill(*mask, bits);
  }

  batchnorm::Weights weights;
  weights.dtype = wtype;
  weights.device = device;
  std::vector<std::unique_ptr<Array>> vectors;
  const auto vector = [&](const std::vector<double>& values) {
    vectors.push_back(std::make_unique<Array>(make_array({features}, wtype, View{}, device)));
    fill(*vectors.back(), values);
    return vectors.back()->ref.data;
  };
  unsigned seed = 100;
  for (const std::string& name : schema.names) {
    std::vector<double> values = random_values(static_cast<std::size_t>(features), ++seed, 0, 0.5);
    if (name == "gamma" || name.find("variance") != std::string::npos ||
        name.find("stddev") != std::string::npos) {
      for (double& v : values) v = 0.75 + std::abs(v);
    }
    *batchnorm::weight_slot(weights, name) = vector(values);
  }
  batchnorm::Adjustment adjustment;
  if (c.adjustment) {
    adjustment.scale = vector(random_values(static_cast<std::size_t>(features), 7, 1.0, 0.2));
    adjustment.bias = vector(random_values(static_cast<std::size_t>(features), 8, 0.0, 0.2));
  }
  const bool gradients = features > 0;
  Array dgamma = make_array({features}, wtype, View{}, device);
  Array dbeta = make_array({features}, wtype, View{}, device);

  batchnorm::Communicator communicator;
  if (communication) {
    communicator.size = communication->size;
    communicator.allgather = [communication, rank](const double* s, double* r, std::size_t k) {
      communication->allgather(rank, s, r, k);
    };
  }
  const batchnorm::Communicator* sync = communication ? &communicator : nullptr;
  const TensorRef* mask_ref = mask ? &mask->ref : nullptr;
  std::unique_ptr<Buffer> storage;
  std::unique_ptr<CaptureScope> captured;
  if (training) {
    batchnorm::TrainingContext context;
    if (capture != Capture::none) {
      use_storage(context, storage, c, features);
      captured = std::make_unique<CaptureScope>(results.problems);
    }
    batchnorm::train_forward(x.ref, y.ref, mask_ref, c.options, weights,
                             c.adjustment ? &adjustment : nullptr, true, context, sync);
    batchnorm::TrainingContext rebuilt;
    if (capture == Capture::rebuilt) {
      rebuilt.groups = context.groups;
      rebuilt.features = context.features;
      rebuilt.has_mask = context.has_mask;
      rebuilt.ghost_batches = context.ghost_batches;
      rebuilt.device =
          batchnorm::cuda::statistics_in(context.device_storage, context.groups, features);
    }
    batchnorm::train_backward(dy.ref, x.ref, dx.ref, mask_ref, c.options, weights,
                              capture == Capture::rebuilt ? rebuilt : context,
                              c.options.scale && gradients ? dgamma.ref.data : nullptr,
                              c.options.center && gradients ? dbeta.ref.data : nullptr, sync);
    captured.reset();
    batchnorm::statistics_to_host(context);
    results.add("mean", context.mean);
    results.add("inv_std", context.inv_std);
  } else {
    if (capture != Capture::none) captured = std::make_unique<CaptureScope>(results.problems);
    batchnorm::infer_forward(x.ref, y.ref, c.options, weights);
    batchnorm::infer_backward(dy.ref, x.ref, dx.ref, c.options, weights,
                              c.options.scale && gradients ? dgamma.ref.data : nullptr,
                              c.options.center && gradients ? dbeta.ref.data : nullptr);
    captured.reset();
  }
  results.add("y", y.values());
  results.add("dx", dx.values());
  if (c.options.scale) results.add("dgamma", dgamma.values());
  if (c.options.center) results.add("dbeta", dbeta.values());
  for (std::size_t i = 0; i < schema.names.size(); ++i) {
    results.add(schema.names[i], vectors[i]->values());
  }
  for (const Array* out : {&y, &dx}) {
    if (!out->untouched_outside()) results.problems.push_back("a write outside an output's view");
  }
  return results;
}

std::vector<Results> run(const Case& c, DType dtype, bool training, Device device) {
  std::vector<Results> all(static_cast<std::size_t>(c.ranks));
  if (c.ranks == 1) {
    all[0] = run_rank(c, dtype, training, device, 0, nullptr);
    return all;
  }
  Communication communication(c.ranks);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(c.ranks));
  for (int r = 0; r < c.ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        all[static_cast<std::size_t>(r)] = run_rank(c, dtype, training, device, r, &communication);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) {
    if (!e.empty()) throw std::runtime_error(e);
  }
  return all;
}

// Tolerances: the backends reduce in different orders, so the statistics differ in their last
// float64 bits and an output may round to the neighbouring value of its dtype.
double data_tolerance(DType d) {
  switch (d) {
    case DType::float16:
      return std::ldexp(1.0, -10);
    case DType::bfloat16:
      return std::ldexp(1.0, -7);
    case DType::float32:
      return std::ldexp(1.0, -22);
    default:
      return 1e-13;
  }
}

void compare(const std::string& label, const Results& cuda, const Results& cpu, DType dtype) {
  for (const std::string& problem : cuda.problems) fail(label + ": " + problem);
  if (cuda.values.size() != cpu.values.size()) {
    fail(label + ": different result sets");
    return;
  }
  const DType wtype = batchnorm::weight_dtype(dtype);
  for (std::size_t k = 0; k < cpu.values.size(); ++k) {
    const std::string& name = cpu.values[k].first;
    const std::vector<double>& want = cpu.values[k].second;
    const std::vector<double>& got = cuda.values[k].second;
    ++checks;
    if (got.size() != want.size()) {
      fail(label + " " + name + ": size " + std::to_string(got.size()) + " instead of " +
           std::to_string(want.size()));
      continue;
    }
    const bool data = name == "y" || name == "dx";
    const bool statistic = name == "mean" || name == "inv_std";
    double scale = 1.0;
    for (double v : want) scale = std::max(scale, std::isfinite(v) ? std::abs(v) : 0.0);
    // Data: per element, by the dtype's rounding; statistics in float64; weights and
    // gradients by the weights' dtype, relative to the vector's largest value.
    const double wtol = wtype == DType::float64 ? 1e-11 : 1e-5;
    for (std::size_t i = 0; i < want.size(); ++i) {
      const double tol = data        ? 2 * data_tolerance(dtype) * std::max(1.0, std::abs(want[i]))
                         : statistic ? 1e-9 * std::max(1.0, std::abs(want[i]))
                                     : wtol * scale;
      const bool same_nan = std::isnan(got[i]) && std::isnan(want[i]);
      if (!same_nan && !(std::abs(got[i] - want[i]) <= tol)) {
        char text[200];
        std::snprintf(text, sizeof text, " %s[%zu]: cuda %.17g cpu %.17g", name.c_str(), i, got[i],
                      want[i]);
        fail(label + text);
        break;
      }
    }
  }
}

Options options(std::vector<int> axes) {
  Options o;
  o.axes = std::move(axes);
  o.momentum = 0.8;
  return o;
}

std::vector<Case> cases() {
  std::vector<Case> list;
  const auto add = [&](std::string name, std::vector<std::int64_t> shape, Options o,
                       View view = {}) {
    Case c;
    c.name = std::move(name);
    c.shape = std::move(shape);
    c.options = std::move(o);
    c.x_view = view;
    list.push_back(c);
    return &list.back();
  };
  add("nchw plane", {8, 16, 6, 6}, options({1}));
  add("nhwc row", {8, 6, 6, 16}, options({-1}));
  add("row odd features", {64, 33}, options({-1}));
  add("plane odd run", {4, 7, 5}, options({1}));
  add("plane h*w multiple of 8", {3, 4, 4, 8}, options({1}));
  add("plane > 32 chunks", {33, 2, 32768}, options({1}));
  add("row > 32 chunks", {140000, 8}, options({-1}));
  add("ghost row", {6, 4, 8}, [] {
    auto o = options({-1});
    o.virtual_batch_size = 2;
    return o;
  }());
  add("ghost plane", {6, 8, 3, 3}, [] {
    auto o = options({1});
    o.virtual_batch_size = 3;
    return o;
  }());
  add("two feature axes", {4, 5, 6, 8}, options({1, 3}));
  add("features of one", {5, 1, 1, 7}, options({-1}));
  add("batch of one", {1, 3, 1, 1}, options({1}));
  add("renorm clipped", {6, 5, 4}, [] {
    auto o = options({1});
    o.renorm = true;
    o.rmax = 1.2;
    o.dmax = 0.3;
    return o;
  }());
  add("no center no scale", {6, 9}, [] {
    auto o = options({-1});
    o.center = false;
    o.scale = false;
    return o;
  }());
  add("adjustment plane", {8, 16, 6, 6}, options({1}))->adjustment = true;
  add("adjustment renorm row", {8, 6, 6, 16},
      [] {
        auto o = options({-1});
        o.renorm = true;
        return o;
      }())
      ->adjustment = true;
  View misaligned;
  misaligned.offset = 1;
  add("misaligned plane", {8, 16, 6, 6}, options({1}), misaligned);
  add("misaligned row", {8, 6, 6, 16}, options({-1}), misaligned);
  View strided;
  strided.step_axis = 1;
  add("strided row", {10, 6, 5}, options({-1}), strided);
  add("strided plane", {10, 6, 5}, options({1}), strided);
  View channels_last;
  channels_last.order = {0, 2, 3, 1};
  add("channels-last nchw", {8, 16, 6, 6}, options({1}), channels_last);
  View transposed;
  transposed.order = {2, 1, 0};
  add("transposed", {10, 12, 5}, options({1}), transposed);
  View expanded;
  expanded.expand_axis = 1;
  add("expanded row", {4, 5, 16}, options({-1}), expanded);
  add("expanded plane", {4, 5, 6}, options({2}), expanded);
  add("empty batch row", {0, 4}, options({-1}));
  add("empty batch plane", {0, 3, 4, 4}, options({1}));
  add("masked row", {6, 40, 8}, options({-1}))->mask = Mask::per_row;
  add("masked plane", {4, 8, 5, 7}, options({1}))->mask = Mask::per_position;
  add("masked ghost", {6, 10, 4},
      [] {
        auto o = options({-1});
        o.virtual_batch_size = 2;
        return o;
      }())
      ->mask = Mask::per_row;
  add("masked renorm", {6, 4, 5, 3},
      [] {
        auto o = options({1});
        o.renorm = true;
        o.rmax = 1.5;
        return o;
      }())
      ->mask = Mask::per_position;
  add("2 ranks row", {6, 4, 8}, options({-1}))->ranks = 2;
  add("3 ranks plane", {4, 8, 3, 3}, options({1}))->ranks = 3;
  add("2 ranks ghost", {6, 4, 8},
      [] {
        auto o = options({-1});
        o.virtual_batch_size = 2;
        return o;
      }())
      ->ranks = 2;
  Case* masked_ranks = add("3 ranks masked renorm", {6, 5, 4}, [] {
    auto o = options({-1});
    o.renorm = true;
    return o;
  }());
  masked_ranks->ranks = 3;
  masked_ranks->mask = Mask::per_row;
  return list;
}

// A host pointer handed to the CUDA backend is refused with an error naming it, before any
// kernel runs, and so is an output on another device's memory.
void check_pointer_validation() {
  Options o = options({-1});
  std::vector<float> host(32, 1.0f);
  Buffer device_x(32 * sizeof(float), kCuda), device_y(32 * sizeof(float), kCuda);
  Buffer w(4 * 4 * sizeof(float), kCuda);
  batchnorm::Weights weights;
  weights.device = kCuda;
  weights.moving_mean = w.data();
  weights.moving_variance = w.data() + 16;
  weights.gamma = w.data() + 32;
  weights.beta = w.data() + 48;
  const auto expect = [&](const TensorRef& x, const TensorRef& y, const char* name) {
    ++checks;
    try {
      batchnorm::infer_forward(x, y, o, weights);
      fail(std::string("a host ") + name + " tagged CUDA was accepted");
    } catch (const std::invalid_argument& e) {
      const std::string text = e.what();
      if (text.find(std::string(name) + " must be memory of CUDA device 0") == std::string::npos) {
        fail(std::string("the error for a host ") + name + " does not name it: " + text);
      }
    }
  };
  const TensorRef on_host = batchnorm::contiguous_view(host.data(), DType::float32, {8, 4}, kCuda);
  const TensorRef x = batchnorm::contiguous_view(device_x.data(), DType::float32, {8, 4}, kCuda);
  const TensorRef y = batchnorm::contiguous_view(device_y.data(), DType::float32, {8, 4}, kCuda);
  expect(on_host, y, "x");
  expect(x, on_host, "y");
  std::vector<float> host_gamma(4, 1.0f);
  weights.gamma = host_gamma.data();
  expect(x, y, "gamma");
}

const char* dtype_label(DType d) { return batchnorm::dtype_name(d); }

bool is_device_memory(const void* pointer) {
  cudaPointerAttributes attributes{};
  return cudaPointerGetAttributes(&attributes, pointer) == cudaSuccess &&
         attributes.type == cudaMemoryTypeDevice;
}

// A call's own vectors: device memory from the stream-ordered pool, released once, after the
// uses recorded for it; memory of the plain allocator is left to its own release.
void check_stream_ordered_memory() {
  ++checks;
  void* data = batchnorm::cuda::allocate_on_stream(96, 0);
  if (!is_device_memory(data)) fail("allocate_on_stream gave no device memory");
  batchnorm::cuda::used(data);
  batchnorm::cuda::used(data);
  batchnorm::cuda::release_after_use(data);
  if (is_device_memory(data)) fail("release_after_use did not free its memory");
  batchnorm::cuda::release_after_use(data);  // a second release finds nothing to free
  void* plain = batchnorm::cuda::allocate(96, 0);
  batchnorm::cuda::used(plain);
  batchnorm::cuda::release_after_use(plain);
  if (!is_device_memory(plain)) fail("release_after_use freed memory it did not allocate");
  batchnorm::cuda::release(plain);
  if (is_device_memory(plain)) fail("release did not free its memory");
}

// The same data one element past a vector boundary (every operand read and written by scalar
// accesses instead of vectors) gives bitwise the same results: the order of the sums does not
// depend on alignment.
void check_offset_independence(const std::vector<Case>& all) {
  for (const char* name : {"nchw plane", "nhwc row", "masked row", "ghost plane", "row > 32"}) {
    const auto found =
        std::find_if(all.begin(), all.end(), [&](const Case& c) { return c.name.find(name) == 0; });
    Case shifted = *found;
    shifted.x_view.offset = 1;
    for (DType dtype : {DType::float32, DType::float64, DType::float16, DType::bfloat16}) {
      const Results aligned = run(*found, dtype, true, kCuda)[0];
      const Results moved = run(shifted, dtype, true, kCuda)[0];
      for (std::size_t k = 0; k < aligned.values.size(); ++k) {
        ++checks;
        const auto& a = aligned.values[k].second;
        const auto& b = moved.values[k].second;
        if (a.size() != b.size() ||
            std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) != 0) {
          fail(std::string(name) + " " + dtype_label(dtype) + " " + aligned.values[k].first +
               ": not bitwise equal at another offset");
        }
      }
    }
  }
}

// A training step (forward and backward) and an inference step captured as CUDA graphs: no
// call that a capture forbids (the emulation lists them), and the same results as the CPU
// backend, for plain, ghost-batch, renorm, masked and adjusted layers in row and plane mode.
void check_graph_capture(const std::vector<Case>& all) {
  for (const char* name : {"nchw plane", "nhwc row", "ghost row", "ghost plane", "renorm clipped",
                           "adjustment renorm row", "masked plane", "masked ghost", "masked renorm",
                           "misaligned row"}) {
    const auto found =
        std::find_if(all.begin(), all.end(), [&](const Case& c) { return c.name == name; });
    if (found == all.end()) {
      fail(std::string("no case ") + name);
      continue;
    }
    for (DType dtype : {DType::float32, DType::float16}) {
      for (Capture how : {Capture::context, Capture::rebuilt}) {
        for (bool training : {true, false}) {
          if (!training && (found->mask != Mask::none || how == Capture::rebuilt)) continue;
          const std::string label = std::string("captured ") + name + " " + dtype_label(dtype) +
                                    (training ? " training" : " inference") +
                                    (how == Capture::rebuilt ? " (rebuilt context)" : "");
          try {
            const Results cpu = run(*found, dtype, training, kCpu)[0];
            const Results cuda = run_rank(*found, dtype, training, kCuda, 0, nullptr, how);
            compare(label, cuda, cpu, dtype);
          } catch (const std::exception& e) {
            fail(label + ": " + e.what());
          }
        }
      }
    }
  }
}

// The capture checks can fail: statistics the backend allocates itself outlive the captured
// step (its graph could not be replayed), and reading statistics to the host waits for the
// device, which a capture forbids.
void check_capture_rules() {
  const Options o = options({-1});
  Buffer x(64 * sizeof(float), kCuda), y(64 * sizeof(float), kCuda),
      w(4 * 8 * sizeof(float), kCuda);
  std::vector<float> ones(32, 1.0f), values(64);
  std::iota(values.begin(), values.end(), 0.0f);
  std::memcpy(x.data(), values.data(), 64 * sizeof(float));
  std::memcpy(w.data(), ones.data(), 32 * sizeof(float));
  batchnorm::Weights weights;
  weights.device = kCuda;
  weights.moving_mean = w.data();
  weights.moving_variance = w.data() + 32;
  weights.gamma = w.data() + 64;
  weights.beta = w.data() + 96;
  const TensorRef xs = batchnorm::contiguous_view(x.data(), DType::float32, {8, 8}, kCuda);
  const TensorRef ys = batchnorm::contiguous_view(y.data(), DType::float32, {8, 8}, kCuda);
  const auto expect = [&](const std::vector<std::string>& problems, const std::string& needle,
                          const char* what) {
    ++checks;
    const bool found = std::any_of(problems.begin(), problems.end(), [&](const std::string& p) {
      return p.find(needle) != std::string::npos;
    });
    if (!found) fail(std::string("the capture checks missed ") + what);
  };
  {
    std::vector<std::string> problems;
    batchnorm::TrainingContext context;
    {
      CaptureScope scope(problems);
      batchnorm::train_forward(xs, ys, nullptr, o, weights, nullptr, true, context);
    }
    expect(problems, "not freed before it ends", "statistics allocated by the backend");
  }
  {
    std::vector<std::string> problems;
    batchnorm::TrainingContext context;
    std::unique_ptr<Buffer> storage;
    Case c;
    c.shape = {8, 8};
    c.options = o;
    use_storage(context, storage, c, 8);
    {
      CaptureScope scope(problems);
      batchnorm::train_forward(xs, ys, nullptr, o, weights, nullptr, true, context);
      try {
        batchnorm::statistics_to_host(context);
      } catch (const std::exception&) {
        // the wait failed, as it should; the capture reports why
      }
    }
    expect(problems, "cudaEventSynchronize", "a host read of the statistics");
  }
}

}  // namespace

int main(int argc, char** argv) {
  // An optional argument selects the cases whose name contains it.
  const std::string only = argc > 1 ? argv[1] : "";
  if (!batchnorm::cuda_available()) {
    std::printf("FAIL the emulated CUDA backend is not available\n");
    return 1;
  }
  int runs = 0;
  const std::vector<Case> all = cases();
  for (const Case& c : all) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    for (DType dtype : {DType::float32, DType::float64, DType::float16, DType::bfloat16}) {
      for (bool training : {true, false}) {
        if (!training && (c.ranks > 1 || c.mask != Mask::none || c.adjustment)) continue;
        const std::string label =
            c.name + " " + dtype_label(dtype) + (training ? " training" : " inference");
        try {
          const auto cpu = run(c, dtype, training, kCpu);
          const auto cuda = run(c, dtype, training, kCuda);
          for (std::size_t r = 0; r < cpu.size(); ++r) {
            compare(label + (c.ranks > 1 ? " rank " + std::to_string(r) : ""), cuda[r], cpu[r],
                    dtype);
          }
        } catch (const std::exception& e) {
          fail(label + ": " + e.what());
        }
        ++runs;
      }
    }
  }
  if (only.empty()) {
    check_pointer_validation();
    check_stream_ordered_memory();
    check_offset_independence(all);
    check_graph_capture(all);
    check_capture_rules();
  }
  std::printf("%d runs, %d checks, %d failures\n", runs, checks, failures);
  return failures == 0 && runs > 0 ? 0 : 1;
}
