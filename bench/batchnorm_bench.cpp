// batchnorm-bench: times the C++ API (training forward, inference, backward) on given shapes,
// after checking each result against a float64 reference, next to a copy-bandwidth probe run in
// the same process (the machines are shared: compare ratios, not absolute times across runs).
// Reports min/median time, effective GB/s under the byte model (the passes over the data a call
// needs at least: training forward 3, inference 2, backward 5), % of the probe and the heap a
// call allocates.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "core/elements.hpp"
#include "cpu/dispatch.hpp"
#include "cuda/runtime.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// ---- heap accounting: every operator new of the process (the library's temporaries) ----------

namespace {

std::atomic<std::int64_t> heap_now{0};
std::atomic<std::int64_t> heap_peak{0};

#if defined(__GLIBC__)
constexpr bool kHeapTracked = true;
void account(void* p) {
  if (!p) return;
  const auto n = static_cast<std::int64_t>(malloc_usable_size(p));
  const std::int64_t now = heap_now.fetch_add(n) + n;
  std::int64_t peak = heap_peak.load();
  while (now > peak && !heap_peak.compare_exchange_weak(peak, now)) {
  }
}
void unaccount(void* p) {
  if (p) heap_now.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(p)));
}
#else
constexpr bool kHeapTracked = false;
void account(void*) {}
void unaccount(void*) {}
#endif

void* allocate(std::size_t n, std::size_t alignment) {
  void* p = nullptr;
  if (alignment <= alignof(std::max_align_t)) {
    p = std::malloc(n ? n : 1);
  } else if (posix_memalign(&p, alignment, n ? n : 1) != 0) {
    p = nullptr;
  }
  if (!p) throw std::bad_alloc();
  account(p);
  return p;
}

void release(void* p) noexcept {
  unaccount(p);
  std::free(p);
}

}  // namespace

void* operator new(std::size_t n) { return allocate(n, alignof(std::max_align_t)); }
void* operator new[](std::size_t n) { return allocate(n, alignof(std::max_align_t)); }
void* operator new(std::size_t n, std::align_val_t a) {
  return allocate(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return allocate(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, alignof(std::max_align_t));
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, alignof(std::max_align_t));
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }

namespace {

using batchnorm::DType;
using batchnorm::TensorRef;
using Shape = std::vector<std::int64_t>;
using Clock = std::chrono::steady_clock;

// ---- options -----------------------------------------------------------------------------

enum class Mode { train, infer, backward };
enum class Variant { plain, mask, ghost, renorm, adjust };

const char* mode_name(Mode m) {
  return m == Mode::train ? "train" : m == Mode::infer ? "infer" : "backward";
}
const char* variant_name(Variant v) {
  switch (v) {
    case Variant::mask:
      return "mask";
    case Variant::ghost:
      return "ghost";
    case Variant::renorm:
      return "renorm";
    case Variant::adjust:
      return "adjust";
    case Variant::plain:
      break;
  }
  return "plain";
}

struct Case {
  Shape shape;  // the data's shape as stored
  int axis;     // the feature axis (resolved, >= 0)
  std::string label;
  Variant variant = Variant::plain;
  std::vector<Mode> modes;
};

struct Settings {
  std::vector<Case> cases;
  DType dtype = DType::float32;
  int threads = 0;  // 0: OpenMP's default
  int reps = 10;
  int calls = 1;           // calls per timed repetition (--calls)
  int read_probe_mib = 0;  // --read-probe: time a read-only pass against the copy instead
  std::string csv;
  bool cuda = false;  // --device cuda
};

[[noreturn]] void usage(const std::string& error) {
  if (!error.empty()) std::cerr << "batchnorm-bench: " << error << "\n\n";
  std::cerr <<
      R"(usage: batchnorm-bench [options]
Times batchnorm's C++ API against a copy-bandwidth probe run in the same process. Without
--shape it runs the default suite (the cases of docs/performance.md), its progress on stderr.
Each row is printed as soon as it is measured; a "!" after "% probe" marks a row whose probe
time varied by more than 25% over the rounds, where that ratio is unreliable.

  --shape N,C,H,W     tensor shape (with --layout) or the stored shape (with --axis)
  --layout L          nchw: features on axis 1; nhwc: the shape is given as N,C,... and stored
                      channels-last (features on the last axis)
  --axis A            feature axis of the stored shape (default -1)
  --dtype D           float32 (default), float64, float16, bfloat16
  --device D          cpu (default) or cuda: data, weights and the probe (a device-to-device
                      copy) on CUDA device 0; each timed call waits for the device
  --mode M[,M...]     train, infer, backward (default: all three)
  --variant V         plain (default), mask, ghost, renorm, adjust (training forward options:
                      an 80% mask, 4 ghost batches, batch renorm, an adjustment)
  --threads T         OpenMP threads for the kernels and the probe (default: OMP_NUM_THREADS)
  --reps R            timed repetitions (default 10); each is paired with a probe run
  --calls N           calls per repetition, back to back on the same arrays (default 1); times
                      are per call. With N > 1 the data stay in cache from call to call, as in a
                      training loop of small calls: what a call costs around its passes
  --isa I             baseline, avx2 or avx512: cap the kernels' instruction set
  --csv FILE          also write the results as CSV (FILE "-" = standard output)
  --read-probe MIB    instead of the cases: time a parallel pass that only reads MIB MiB (more
                      than the caches hold, such as 128) against the copy probe over the same
                      bytes, and print the shares of the probe the byte model then leaves a row
                      layout, whose passes read the input twice
)";
  std::exit(error.empty() ? 0 : 2);
}

Shape parse_shape(const std::string& text) {
  Shape shape;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v < 1) usage("bad --shape '" + text + "'");
    shape.push_back(v);
  }
  if (shape.empty() || shape.size() > static_cast<std::size_t>(batchnorm::kMaxRank)) {
    usage("bad --shape '" + text + "'");
  }
  return shape;
}

std::vector<Mode> parse_modes(const std::string& text) {
  std::vector<Mode> modes;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item == "train") {
      modes.push_back(Mode::train);
    } else if (item == "infer") {
      modes.push_back(Mode::infer);
    } else if (item == "backward") {
      modes.push_back(Mode::backward);
    } else {
      usage("bad --mode '" + item + "'");
    }
  }
  return modes;
}

std::string shape_text(const Shape& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + ")";
}

// Channels-last storage of a shape given as (N, C, spatial...).
Shape channels_last(const Shape& nc) {
  Shape s{nc[0]};
  s.insert(s.end(), nc.begin() + 2, nc.end());
  s.push_back(nc[1]);
  return s;
}

Case make_case(const Shape& given, const std::string& layout, int axis, Variant variant,
               std::vector<Mode> modes) {
  Case c;
  c.variant = variant;
  c.modes = std::move(modes);
  if (layout == "nchw" || layout == "nhwc") {
    if (given.size() < 3) usage("--layout needs a shape (N, C, spatial...)");
    c.shape = layout == "nchw" ? given : channels_last(given);
    c.axis = layout == "nchw" ? 1 : static_cast<int>(given.size()) - 1;
    c.label = shape_text(given) + " " + (layout == "nchw" ? "NCHW" : "NHWC");
  } else if (layout.empty()) {
    const int rank = static_cast<int>(given.size());
    if (axis < -rank || axis >= rank) usage("--axis out of range for the shape");
    c.shape = given;
    c.axis = axis < 0 ? axis + rank : axis;
    c.label = shape_text(given) + " axis " + std::to_string(axis);
  } else {
    usage("bad --layout '" + layout + "'");
  }
  if (variant == Variant::ghost && (c.axis == 0 || c.shape[0] % 4 != 0)) {
    usage("--variant ghost needs a batch (axis 0, a multiple of 4) that is not the feature axis");
  }
  return c;
}

// The cases of the issue: image shapes in both layouts, an RGB input channels-last (rows of three
// features), dense and sequence shapes, a small tensor (call overhead), and the training-forward
// options on the largest image shape.
std::vector<Case> default_suite() {
  const std::vector<Mode> all{Mode::train, Mode::infer, Mode::backward};
  std::vector<Case> cases;
  for (const Shape& s : {Shape{32, 64, 112, 112}, Shape{64, 256, 28, 28}, Shape{256, 2048, 7, 7}}) {
    cases.push_back(make_case(s, "nchw", 1, Variant::plain, all));
    cases.push_back(make_case(s, "nhwc", -1, Variant::plain, all));
  }
  cases.push_back(make_case({32, 3, 224, 224}, "nhwc", -1, Variant::plain, all));
  cases.push_back(make_case({65536, 512}, "", -1, Variant::plain, all));
  cases.push_back(make_case({64, 128, 1024}, "", -1, Variant::plain, all));
  cases.push_back(make_case({64, 256}, "", -1, Variant::plain, all));
  for (const char* layout : {"nchw", "nhwc"}) {
    for (Variant v : {Variant::mask, Variant::ghost, Variant::renorm, Variant::adjust}) {
      cases.push_back(make_case({32, 64, 112, 112}, layout, 1, v, {Mode::train}));
    }
  }
  return cases;
}

Settings parse(int argc, char** argv) {
  Settings s;
  Shape shape;
  std::string layout;
  int axis = -1;
  Variant variant = Variant::plain;
  std::vector<Mode> modes{Mode::train, Mode::infer, Mode::backward};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") usage("");
    if (i + 1 >= argc) usage("missing value for " + arg);
    const std::string value = argv[++i];
    if (arg == "--shape") {
      shape = parse_shape(value);
    } else if (arg == "--layout") {
      layout = value;
    } else if (arg == "--axis") {
      axis = std::atoi(value.c_str());
    } else if (arg == "--dtype") {
      bool known = false;
      batchnorm::detail::for_each_element([&](auto element) {
        const DType dtype = batchnorm::detail::dtype_of<decltype(element)>;
        if (value == batchnorm::dtype_name(dtype)) {
          s.dtype = dtype;
          known = true;
        }
      });
      if (!known) usage("bad --dtype '" + value + "'");
    } else if (arg == "--device") {
      if (value != "cpu" && value != "cuda") usage("bad --device '" + value + "'");
      s.cuda = value == "cuda";
      if (s.cuda && !batchnorm::cuda_available()) {
        usage("--device cuda: no CUDA device (or a build without the CUDA backend)");
      }
    } else if (arg == "--mode") {
      modes = parse_modes(value);
    } else if (arg == "--variant") {
      bool known = false;
      for (Variant v :
           {Variant::plain, Variant::mask, Variant::ghost, Variant::renorm, Variant::adjust}) {
        if (value == variant_name(v)) {
          variant = v;
          known = true;
        }
      }
      if (!known) usage("bad --variant '" + value + "'");
    } else if (arg == "--threads") {
      s.threads = std::atoi(value.c_str());
      if (s.threads < 1) usage("--threads must be >= 1");
    } else if (arg == "--reps") {
      s.reps = std::atoi(value.c_str());
      if (s.reps < 1) usage("--reps must be >= 1");
    } else if (arg == "--calls") {
      s.calls = std::atoi(value.c_str());
      if (s.calls < 1) usage("--calls must be >= 1");
    } else if (arg == "--isa") {
      if (value != "baseline" && value != "avx2" && value != "avx512") {
        usage("bad --isa '" + value + "'");
      }
      setenv("BATCHNORM_CPU_ISA", value.c_str(), 1);
    } else if (arg == "--csv") {
      s.csv = value;
    } else if (arg == "--read-probe") {
      s.read_probe_mib = std::atoi(value.c_str());
      if (s.read_probe_mib < 1) usage("--read-probe needs a size of at least 1 MiB");
    } else {
      usage("unknown option " + arg);
    }
  }
  if (shape.empty()) {
    if (!layout.empty() || variant != Variant::plain) usage("--layout/--variant need --shape");
    s.cases = default_suite();
  } else {
    s.cases.push_back(make_case(shape, layout, axis, variant, modes));
  }
  for (Case& c : s.cases) {
    if (c.variant != Variant::plain) {
      c.modes.erase(
          std::remove_if(c.modes.begin(), c.modes.end(), [](Mode m) { return m != Mode::train; }),
          c.modes.end());
      if (c.modes.empty()) usage("--variant applies to the training forward (--mode train)");
    }
  }
  return s;
}

// ---- buffers and data --------------------------------------------------------------------

struct Buffer {
  std::unique_ptr<unsigned char, void (*)(void*)> data{nullptr, std::free};
  std::size_t bytes = 0;

  explicit Buffer(std::size_t n) : bytes(n) {
    // Not operator new: the benchmark's own buffers are not the library's heap use.
    void* p = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    data.reset(static_cast<unsigned char*>(p));
    std::memset(p, 0, n);  // touch every page before timing
  }
  void* get() const { return data.get(); }
};

// --device cuda: a copy of a host buffer on CUDA device 0. The host buffer keeps the data the
// reference reads; results come back with download() before they are checked.
struct Mirror {
  void* host;
  std::size_t bytes;
  void* device = nullptr;
  Mirror(void* h, std::size_t n, bool cuda) : host(h), bytes(n) {
    if (cuda) {
      device = batchnorm::cuda::allocate(n, 0);
      upload();
    }
  }
  ~Mirror() { batchnorm::cuda::release(device); }
  Mirror(const Mirror&) = delete;
  Mirror& operator=(const Mirror&) = delete;
  void* get() const { return device ? device : host; }
  void upload() const {
    if (device) batchnorm::cuda::copy(device, host, bytes);
  }
  void download() const {
    if (device) batchnorm::cuda::copy(host, device, bytes);
  }
};

// Deterministic pseudo-normal values (sum of uniforms), the same for every run.
struct Random {
  std::uint64_t state;
  explicit Random(std::uint64_t seed) : state(seed * 0x9e3779b97f4a7c15ull + 1) {}
  double uniform() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(state >> 11) * 0x1.0p-53;
  }
  double normal() { return uniform() + uniform() + uniform() + uniform() - 2.0; }
};

void store_as(DType d, void* base, std::size_t i, double v) {
  batchnorm::detail::visit_element(d, [&](auto element) {
    using T = decltype(element);
    static_cast<T*>(base)[i] = batchnorm::detail::store<T>(v);
  });
}

double load_as(DType d, const void* base, std::size_t i) {
  double value = 0.0;
  batchnorm::detail::visit_element(d, [&](auto element) {
    using T = decltype(element);
    value = batchnorm::detail::load<double>(static_cast<const T*>(base)[i]);
  });
  return value;
}

// The data viewed as (outer, C, inner) around the feature axis.
struct Geometry {
  std::int64_t outer = 1, features = 1, inner = 1, batch = 1;
  explicit Geometry(const Case& c) {
    for (int i = 0; i < static_cast<int>(c.shape.size()); ++i) {
      if (i < c.axis) outer *= c.shape[i];
      if (i > c.axis) inner *= c.shape[i];
    }
    features = c.shape[c.axis];
    batch = c.shape[0];
  }
  std::int64_t numel() const { return outer * features * inner; }
  std::size_t index(std::int64_t o, std::int64_t c, std::int64_t i) const {
    return static_cast<std::size_t>((o * features + c) * inner + i);
  }
};

constexpr double kEpsilon = 1e-3;
constexpr double kMomentum = 0.99;
constexpr int kGhostGroups = 4;

// ---- the float64 reference ---------------------------------------------------------------

struct Parameters {
  std::vector<double> gamma, beta, moving_mean, moving_variance, renorm_mean, renorm_stddev,
      adjust_scale, adjust_bias;
};

struct Expected {
  std::vector<double> y, moving_mean, moving_variance, dx, dgamma, dbeta;
};

// Training forward in its textbook form: per (ghost group, feature) statistics over the valid
// positions, renorm and adjustment on x-hat, then gamma/beta; the Keras moving update.
void reference_train(const Case& c, const Geometry& g, const std::vector<double>& x,
                     const std::vector<std::uint8_t>& mask, const Parameters& p, Expected& e) {
  const std::int64_t groups = c.variant == Variant::ghost ? kGhostGroups : 1;
  const std::int64_t per_sample = g.outer / g.batch;
  const auto group_of = [&](std::int64_t o) { return (o / per_sample) % groups; };
  const auto valid = [&](std::int64_t o, std::int64_t i) {
    return mask.empty() || mask[static_cast<std::size_t>(o * g.inner + i)] != 0;
  };
  const auto C = static_cast<std::size_t>(g.features);
  std::vector<double> count(groups * C), mean(groups * C), var(groups * C);
  for (std::int64_t o = 0; o < g.outer; ++o) {
    for (std::int64_t f = 0; f < g.features; ++f) {
      for (std::int64_t i = 0; i < g.inner; ++i) {
        if (!valid(o, i)) continue;
        const std::size_t k = static_cast<std::size_t>(group_of(o)) * C + f;
        count[k] += 1.0;
        mean[k] += x[g.index(o, f, i)];
      }
    }
  }
  for (std::size_t k = 0; k < count.size(); ++k) mean[k] = count[k] > 0 ? mean[k] / count[k] : 0;
  for (std::int64_t o = 0; o < g.outer; ++o) {
    for (std::int64_t f = 0; f < g.features; ++f) {
      for (std::int64_t i = 0; i < g.inner; ++i) {
        if (!valid(o, i)) continue;
        const std::size_t k = static_cast<std::size_t>(group_of(o)) * C + f;
        const double d = x[g.index(o, f, i)] - mean[k];
        var[k] += d * d;
      }
    }
  }
  for (std::size_t k = 0; k < count.size(); ++k) var[k] = count[k] > 0 ? var[k] / count[k] : 0;
  std::vector<double> r(C, 1.0), d(C, 0.0);
  e.moving_mean = p.moving_mean;
  e.moving_variance = p.moving_variance;
  for (std::size_t f = 0; f < C; ++f) {
    double batch_mean = 0, batch_var = 0;
    for (std::int64_t grp = 0; grp < groups; ++grp) {
      batch_mean += mean[grp * C + f] / static_cast<double>(groups);
      batch_var += var[grp * C + f] / static_cast<double>(groups);
    }
    const double batch_std = std::sqrt(batch_var + kEpsilon);
    if (c.variant == Variant::renorm) {
      const double renorm_std = std::max(p.renorm_stddev[f], std::sqrt(kEpsilon));
      r[f] = batch_std / renorm_std;
      d[f] = (batch_mean - p.renorm_mean[f]) / renorm_std;
      // Keras assigns the variance from the averaged stddev (moving_stddev starts at sqrt(1)).
      const double stddev = 1.0 * kMomentum + batch_std * (1 - kMomentum);
      e.moving_variance[f] = std::max(stddev * stddev - kEpsilon, 0.0);
    } else {
      e.moving_variance[f] = p.moving_variance[f] * kMomentum + batch_var * (1 - kMomentum);
    }
    e.moving_mean[f] = p.moving_mean[f] * kMomentum + batch_mean * (1 - kMomentum);
  }
  e.y.assign(x.size(), 0.0);
  for (std::int64_t o = 0; o < g.outer; ++o) {
    for (std::int64_t f = 0; f < g.features; ++f) {
      const std::size_t k = static_cast<std::size_t>(group_of(o)) * C + f;
      for (std::int64_t i = 0; i < g.inner; ++i) {
        double z = (x[g.index(o, f, i)] - mean[k]) / std::sqrt(var[k] + kEpsilon);
        z = z * r[f] + d[f];
        if (c.variant == Variant::adjust) z = z * p.adjust_scale[f] + p.adjust_bias[f];
        e.y[g.index(o, f, i)] = z * p.gamma[f] + p.beta[f];
      }
    }
  }
}

void reference_infer(const Geometry& g, const std::vector<double>& x, const Parameters& p,
                     Expected& e) {
  e.y.assign(x.size(), 0.0);
  for (std::int64_t o = 0; o < g.outer; ++o) {
    for (std::int64_t f = 0; f < g.features; ++f) {
      const double inv = p.gamma[f] / std::sqrt(p.moving_variance[f] + kEpsilon);
      for (std::int64_t i = 0; i < g.inner; ++i) {
        e.y[g.index(o, f, i)] = (x[g.index(o, f, i)] - p.moving_mean[f]) * inv + p.beta[f];
      }
    }
  }
}

// Backward of the plain training forward: dx, dgamma = sum(dy * xhat), dbeta = sum(dy).
void reference_backward(const Geometry& g, const std::vector<double>& x,
                        const std::vector<double>& dy, const Parameters& p, Expected& e) {
  const auto C = static_cast<std::size_t>(g.features);
  const double n = static_cast<double>(g.outer * g.inner);
  std::vector<double> mean(C), inv(C);
  e.dgamma.assign(C, 0.0);
  e.dbeta.assign(C, 0.0);
  e.dx.assign(x.size(), 0.0);
  for (std::size_t f = 0; f < C; ++f) {
    double sum = 0, squares = 0;
    for (std::int64_t o = 0; o < g.outer; ++o) {
      for (std::int64_t i = 0; i < g.inner; ++i) sum += x[g.index(o, f, i)];
    }
    mean[f] = sum / n;
    for (std::int64_t o = 0; o < g.outer; ++o) {
      for (std::int64_t i = 0; i < g.inner; ++i) {
        const double d = x[g.index(o, f, i)] - mean[f];
        squares += d * d;
      }
    }
    inv[f] = 1.0 / std::sqrt(squares / n + kEpsilon);
    for (std::int64_t o = 0; o < g.outer; ++o) {
      for (std::int64_t i = 0; i < g.inner; ++i) {
        const std::size_t at = g.index(o, f, i);
        e.dbeta[f] += dy[at];
        e.dgamma[f] += dy[at] * (x[at] - mean[f]) * inv[f];
      }
    }
    for (std::int64_t o = 0; o < g.outer; ++o) {
      for (std::int64_t i = 0; i < g.inner; ++i) {
        const std::size_t at = g.index(o, f, i);
        const double xhat = (x[at] - mean[f]) * inv[f];
        e.dx[at] = p.gamma[f] * inv[f] * (dy[at] - e.dbeta[f] / n - xhat * e.dgamma[f] / n);
      }
    }
  }
}

// Worst error relative to the values' scale: |got - want| / (1 + |want|), or per-feature sums
// relative to the sum of magnitudes behind them.
double worst_error(const std::vector<double>& got, const std::vector<double>& want,
                   double scale = 1.0) {
  double worst = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]) / (scale + std::fabs(want[i]));
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  return worst;
}

double tolerance(DType d) {
  switch (d) {
    case DType::float64:
      return 1e-9;
    case DType::float32:
      return 1e-4;
    case DType::float16:
      return 4e-3;
    default:
      return 3e-2;
  }
}

// ---- the copy-bandwidth probe ------------------------------------------------------------

// The calling thread's part [lo, hi) of `bytes`, in whole 64-byte lines but for the last part,
// within a parallel region (all of them outside one).
std::pair<std::size_t, std::size_t> thread_share(std::size_t bytes) {
#if defined(_OPENMP)
  const std::size_t t = static_cast<std::size_t>(omp_get_thread_num());
  const std::size_t threads = static_cast<std::size_t>(omp_get_num_threads());
#else
  const std::size_t t = 0, threads = 1;
#endif
  const std::size_t lo = bytes * t / threads / 64 * 64;
  const std::size_t hi = t + 1 == threads ? bytes : bytes * (t + 1) / threads / 64 * 64;
  return {lo, hi};
}

// Parallel copy with non-temporal stores (the fastest plain copy on x86: no read-for-ownership).
void copy_probe(const unsigned char* from, unsigned char* to, std::size_t bytes) {
#pragma omp parallel
  {
    const auto [lo, hi] = thread_share(bytes);
#if defined(__SSE2__)
    std::size_t i = lo;
    for (; i + 64 <= hi; i += 64) {
      const __m128i* in = reinterpret_cast<const __m128i*>(from + i);
      __m128i* out = reinterpret_cast<__m128i*>(to + i);
      _mm_stream_si128(out, _mm_load_si128(in));
      _mm_stream_si128(out + 1, _mm_load_si128(in + 1));
      _mm_stream_si128(out + 2, _mm_load_si128(in + 2));
      _mm_stream_si128(out + 3, _mm_load_si128(in + 3));
    }
    std::memcpy(to + i, from + i, hi - i);
    _mm_sfence();
#else
    std::memcpy(to + lo, from + lo, hi - lo);
#endif
  }
}

// A parallel pass that only reads `bytes` (it adds them up): what a statistics or sums pass costs
// at least, besides its arithmetic. Returns the sum, so that the reads cannot be left out.
std::uint64_t read_probe(const unsigned char* from, std::size_t bytes) {
  std::uint64_t total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const auto [lo, hi] = thread_share(bytes);
    std::size_t i = lo;
#if defined(__SSE2__)
    __m128i a = _mm_setzero_si128(), b = a, c = a, d = a;  // four chains of additions
    for (; i + 64 <= hi; i += 64) {
      const __m128i* in = reinterpret_cast<const __m128i*>(from + i);
      a = _mm_add_epi64(a, _mm_load_si128(in));
      b = _mm_add_epi64(b, _mm_load_si128(in + 1));
      c = _mm_add_epi64(c, _mm_load_si128(in + 2));
      d = _mm_add_epi64(d, _mm_load_si128(in + 3));
    }
    std::uint64_t lanes[2];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes),
                     _mm_add_epi64(_mm_add_epi64(a, b), _mm_add_epi64(c, d)));
    total += lanes[0] + lanes[1];
#endif
    for (; i < hi; ++i) total += from[i];
  }
  return total;
}

// ---- running a case ----------------------------------------------------------------------

// Above this spread of the probe's times ((max - min) / median) a row's "% probe" is flagged.
constexpr double kSteadyProbeSpread = 0.25;

struct Result {
  std::string label, mode, variant;
  double min_ms = 0, median_ms = 0, gbps = 0, probe_gbps = 0, percent = 0;
  double versus_plain = 0;  // training options: time over a plain training forward's
  // How much the probe's time varied over the rounds: (max - min) / median. Where it is large the
  // memory system changed under the run (other processes, frequency) and "% probe" is unreliable.
  double probe_spread = 0;
  double error = 0;
  std::int64_t heap_bytes = 0;
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Weights of dtype float32 (16/32-bit data) or float64, as the API wants them.
struct WeightBuffers {
  DType dtype;
  std::vector<Buffer> vectors;
  WeightBuffers(DType data, std::size_t features) : dtype(batchnorm::weight_dtype(data)) {
    for (int i = 0; i < 11; ++i) vectors.emplace_back(features * batchnorm::dtype_size(dtype));
  }
  void set(int which, const std::vector<double>& values) {
    for (std::size_t i = 0; i < values.size(); ++i)
      store_as(dtype, vectors[which].get(), i, values[i]);
  }
  std::vector<double> get(int which, std::size_t n) const {
    std::vector<double> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = load_as(dtype, vectors[which].get(), i);
    return v;
  }
  void* ptr(int which) const { return vectors[which].get(); }
};

enum Slot {
  kGamma,
  kBeta,
  kMovingMean,
  kMovingVariance,
  kMovingStddev,
  kRenormMean,
  kRenormStddev,
  kAdjustScale,
  kAdjustBias,
  kDgamma,
  kDbeta
};

std::vector<Result> run_case(const Case& c, const Settings& s) {
  const Geometry g(c);
  const DType dtype = s.dtype;
  const std::size_t n = static_cast<std::size_t>(g.numel());
  const std::size_t bytes = n * batchnorm::dtype_size(dtype);
  const auto C = static_cast<std::size_t>(g.features);

  Buffer x(bytes), y(bytes), dy(bytes), dx(bytes), probe_from(bytes), probe_to(bytes);
  std::vector<double> x64(n), dy64(n);
  Random rng(42);
  for (std::size_t i = 0; i < n; ++i) {
    // Per-feature offsets and scales, so that every statistic differs.
    const std::size_t f = (i / static_cast<std::size_t>(g.inner)) % C;
    store_as(dtype, x.get(), i,
             0.5 + 0.01 * static_cast<double>(f) + (1.0 + 0.001 * f) * rng.normal());
    x64[i] = load_as(dtype, x.get(), i);
    store_as(dtype, dy.get(), i, rng.normal());
    dy64[i] = load_as(dtype, dy.get(), i);
  }
  std::memset(probe_from.get(), 1, bytes);
  const Mirror xd(x.get(), bytes, s.cuda), yd(y.get(), bytes, s.cuda), dyd(dy.get(), bytes, s.cuda);
  const Mirror dxd(dx.get(), bytes, s.cuda), probe_from_d(probe_from.get(), bytes, s.cuda);
  const Mirror probe_to_d(probe_to.get(), bytes, s.cuda);
  const batchnorm::Device device{s.cuda ? batchnorm::DeviceType::cuda : batchnorm::DeviceType::cpu,
                                 0};

  Parameters p;
  for (std::size_t f = 0; f < C; ++f) {
    p.gamma.push_back(1.0 + 0.1 * rng.normal());
    p.beta.push_back(0.1 * rng.normal());
    p.moving_mean.push_back(0.5 + 0.01 * static_cast<double>(f));
    p.moving_variance.push_back(1.0 + 0.002 * static_cast<double>(f));
    p.renorm_mean.push_back(0.4);
    p.renorm_stddev.push_back(1.1);
    p.adjust_scale.push_back(1.0 + 0.05 * rng.normal());
    p.adjust_bias.push_back(0.05 * rng.normal());
  }
  WeightBuffers w(dtype, C);
  std::vector<std::unique_ptr<Mirror>> wd;  // the weights where the data is
  for (int k = kGamma; k <= kDbeta; ++k) {
    wd.push_back(std::make_unique<Mirror>(w.ptr(k), C * batchnorm::dtype_size(w.dtype), s.cuda));
  }
  const auto reset_weights = [&] {
    w.set(kGamma, p.gamma);
    w.set(kBeta, p.beta);
    w.set(kMovingMean, p.moving_mean);
    w.set(kMovingVariance, p.moving_variance);
    w.set(kMovingStddev, std::vector<double>(C, 1.0));
    w.set(kRenormMean, p.renorm_mean);
    w.set(kRenormStddev, p.renorm_stddev);
    w.set(kAdjustScale, p.adjust_scale);
    w.set(kAdjustBias, p.adjust_bias);
    for (const auto& m : wd) m->upload();
  };
  reset_weights();
  batchnorm::Weights weights;
  weights.dtype = w.dtype;
  weights.device = device;
  weights.gamma = wd[kGamma]->get();
  weights.beta = wd[kBeta]->get();
  weights.moving_mean = wd[kMovingMean]->get();
  weights.moving_variance = wd[kMovingVariance]->get();
  weights.moving_stddev = wd[kMovingStddev]->get();
  weights.renorm_mean = wd[kRenormMean]->get();
  weights.renorm_stddev = wd[kRenormStddev]->get();
  batchnorm::Adjustment adjustment{wd[kAdjustScale]->get(), wd[kAdjustBias]->get()};

  batchnorm::Options options;
  options.axes = {c.axis};
  options.momentum = kMomentum;
  options.epsilon = kEpsilon;
  options.renorm = c.variant == Variant::renorm;
  if (c.variant == Variant::ghost) options.virtual_batch_size = g.batch / kGhostGroups;
  batchnorm::Options plain_options;
  plain_options.axes = options.axes;
  plain_options.momentum = kMomentum;
  plain_options.epsilon = kEpsilon;

  const TensorRef xt = batchnorm::contiguous_view(xd.get(), dtype, c.shape, device);
  const TensorRef yt = batchnorm::contiguous_view(yd.get(), dtype, c.shape, device);
  const TensorRef dyt = batchnorm::contiguous_view(dyd.get(), dtype, c.shape, device);
  const TensorRef dxt = batchnorm::contiguous_view(dxd.get(), dtype, c.shape, device);
  // The mask covers the positions (the shape without the feature axis), broadcast over C.
  std::vector<std::uint8_t> mask;
  TensorRef mask_view;
  const TensorRef* mask_ptr = nullptr;
  std::unique_ptr<Mirror> mask_d;
  if (c.variant == Variant::mask) {
    mask.resize(static_cast<std::size_t>(g.outer * g.inner));
    for (auto& m : mask) m = rng.uniform() < 0.8;
    mask_d = std::make_unique<Mirror>(mask.data(), mask.size(), s.cuda);
    mask_view = batchnorm::contiguous_view(mask_d->get(), DType::boolean, c.shape, device);
    for (int i = 0; i < mask_view.rank; ++i) {
      if (i < c.axis) mask_view.strides[i] /= g.features;
    }
    mask_view.strides[c.axis] = 0;
    mask_ptr = &mask_view;
  }
  const batchnorm::Adjustment* adjust = c.variant == Variant::adjust ? &adjustment : nullptr;

  batchnorm::TrainingContext context, plain_context;
  std::vector<Result> results;
  for (Mode mode : c.modes) {
    std::function<void()> call;
    double passes = 0;
    switch (mode) {
      case Mode::train:
        call = [&] {
          batchnorm::train_forward(xt, yt, mask_ptr, options, weights, adjust, true, context);
        };
        passes = 3;
        break;
      case Mode::infer:
        call = [&] { batchnorm::infer_forward(xt, yt, options, weights); };
        passes = 2;
        break;
      case Mode::backward:
        call = [&] {
          batchnorm::train_backward(dyt, xt, dxt, nullptr, options, weights, context,
                                    wd[kDgamma]->get(), wd[kDbeta]->get());
        };
        passes = 5;
        break;
    }

    // Validate a first call (which also touches the outputs' pages) against the reference.
    reset_weights();
    Expected e;
    double error = 0.0;
    if (mode == Mode::backward) {
      batchnorm::train_forward(xt, yt, nullptr, options, weights, nullptr, true, context);
      reset_weights();
      call();
      reference_backward(g, x64, dy64, p, e);
      dxd.download();
      for (const auto& m : wd) m->download();
      std::vector<double> got(n);
      for (std::size_t i = 0; i < n; ++i) got[i] = load_as(dtype, dx.get(), i);
      double dy_scale = 0.0;
      for (double v : dy64) dy_scale += std::fabs(v);
      dy_scale /= static_cast<double>(C);
      error = std::max({worst_error(got, e.dx), worst_error(w.get(kDgamma, C), e.dgamma, dy_scale),
                        worst_error(w.get(kDbeta, C), e.dbeta, dy_scale)});
    } else {
      call();
      if (mode == Mode::train) {
        reference_train(c, g, x64, mask, p, e);
      } else {
        reference_infer(g, x64, p, e);
      }
      yd.download();
      for (const auto& m : wd) m->download();
      std::vector<double> got(n);
      for (std::size_t i = 0; i < n; ++i) got[i] = load_as(dtype, y.get(), i);
      error = worst_error(got, e.y);
      if (mode == Mode::train) {
        error = std::max({error, worst_error(w.get(kMovingMean, C), e.moving_mean),
                          worst_error(w.get(kMovingVariance, C), e.moving_variance)});
      }
    }
    if (!(error <= tolerance(dtype))) {
      std::ostringstream message;
      message << c.label << " " << mode_name(mode) << " " << variant_name(c.variant)
              << ": result differs from the float64 reference (worst relative error " << error
              << ")";
      throw std::runtime_error(message.str());
    }

    // Heap a call allocates on top of what is live before it (its temporaries).
    heap_peak.store(heap_now.load());
    const std::int64_t before = heap_now.load();
    call();
    const std::int64_t heap = heap_peak.load() - before;

    // A training option's cost: a plain training forward on the same data, timed in the same
    // rounds, so that the ratio holds however the machine's speed drifts.
    std::function<void()> plain;
    if (c.variant != Variant::plain) {
      plain = [&] {
        batchnorm::train_forward(xt, yt, nullptr, plain_options, weights, nullptr, true,
                                 plain_context);
      };
      plain();
    }

    // One untimed probe first: it starts (or wakes) the OpenMP team the kernels reuse.
    copy_probe(static_cast<const unsigned char*>(probe_from.get()),
               static_cast<unsigned char*>(probe_to.get()), bytes);
    std::vector<double> times, probes, plain_times;
    for (int r = 0; r < s.reps; ++r) {
      Clock::time_point start = Clock::now();
      if (s.cuda) {
        batchnorm::cuda::copy(probe_to_d.get(), probe_from_d.get(), bytes);
        batchnorm::cuda::synchronize(0);
      } else {
        copy_probe(static_cast<const unsigned char*>(probe_from.get()),
                   static_cast<unsigned char*>(probe_to.get()), bytes);
      }
      probes.push_back(seconds_since(start));
      start = Clock::now();
      for (int c = 0; c < s.calls; ++c) call();
      if (s.cuda) batchnorm::cuda::synchronize(0);
      times.push_back(seconds_since(start) / s.calls);
      if (plain) {
        start = Clock::now();
        for (int c = 0; c < s.calls; ++c) plain();
        if (s.cuda) batchnorm::cuda::synchronize(0);
        plain_times.push_back(seconds_since(start) / s.calls);
      }
    }
    // Per-round ratios, then their median: robust to the bandwidth drifting between rounds.
    std::vector<double> percents, versus;
    for (int r = 0; r < s.reps; ++r) {
      percents.push_back(100.0 * passes * probes[size_t(r)] / (2.0 * times[size_t(r)]));
      if (plain) versus.push_back(times[size_t(r)] / plain_times[size_t(r)]);
    }
    Result res;
    res.label = c.label;
    res.mode = mode_name(mode);
    res.variant = variant_name(c.variant);
    res.min_ms = *std::min_element(times.begin(), times.end()) * 1e3;
    res.median_ms = median(times) * 1e3;
    res.gbps = passes * static_cast<double>(bytes) / median(times) / 1e9;
    res.probe_gbps = 2.0 * static_cast<double>(bytes) / median(probes) / 1e9;
    res.percent = median(percents);
    const auto [fastest, slowest] = std::minmax_element(probes.begin(), probes.end());
    res.probe_spread = (*slowest - *fastest) / median(probes);
    if (plain) res.versus_plain = median(versus);
    res.error = error;
    res.heap_bytes = heap;
    results.push_back(res);
  }
  return results;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

const char* dtype_text(DType d) { return batchnorm::dtype_name(d); }

// --read-probe: a read-only pass and the copy probe over the same bytes, alternated, and what
// their ratio r leaves a row layout under the byte model. Its training forward reads the input
// twice (statistics, then output) and writes once: with the output pass at the probe's speed it
// takes (r + 1) / 1.5 of the time the model allows, so at most 1.5 / (1 + r) of the probe; its
// backward reads dy and x twice and writes dx: at most 2.5 / (1.5 + 2r).
int run_read_probe(const Settings& s) {
  const std::size_t bytes = static_cast<std::size_t>(s.read_probe_mib) << 20;
  Buffer from(bytes), to(bytes);
  std::memset(from.get(), 1, bytes);
  const auto* in = static_cast<const unsigned char*>(from.get());
  auto* out = static_cast<unsigned char*>(to.get());
  std::uint64_t sink = read_probe(in, bytes);  // (wakes the OpenMP team)
  copy_probe(in, out, bytes);
  std::vector<double> reads, copies, ratios;
  for (int r = 0; r < s.reps; ++r) {
    auto start = Clock::now();
    sink += read_probe(in, bytes);
    reads.push_back(seconds_since(start));
    start = Clock::now();
    copy_probe(in, out, bytes);
    copies.push_back(seconds_since(start));
    ratios.push_back(reads.back() / copies.back());
  }
  const double ratio = median(ratios);
  std::printf("read-only pass %.3f ms, copy probe %.3f ms over %d MiB (medians of %d rounds)\n",
              median(reads) * 1e3, median(copies) * 1e3, s.read_probe_mib, s.reps);
  std::printf("read / copy r = %.2f (median of per-round ratios)\n", ratio);
  std::printf(
      "row layouts, input read twice: training forward at most %.0f%% of the probe, "
      "backward at most %.0f%%\n",
      100 * 1.5 / (1 + ratio), 100 * 2.5 / (1.5 + 2 * ratio));
  return sink == 0 ? 1 : 0;  // (every byte is 1: the sum is never 0)
}

}  // namespace

int main(int argc, char** argv) {
  const Settings s = parse(argc, argv);
#if defined(_OPENMP)
  if (s.threads > 0) omp_set_num_threads(s.threads);
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  if (s.read_probe_mib > 0) {
    std::printf("batchnorm-bench: %s, %d thread(s)\n", cpu_model().c_str(), threads);
    return run_read_probe(s);
  }
  std::printf("batchnorm-bench: %s, %d thread(s), kernels %s, %s, %d reps\n", cpu_model().c_str(),
              threads, batchnorm::cpu::isa_name(batchnorm::cpu::active_isa()), dtype_text(s.dtype),
              s.reps);
  std::printf(
      "probe: %s of the same size in the same run; GB/s use the byte model (train 3, infer 2,"
      " backward 5 passes); %% probe and x plain are medians of per-round ratios\n\n",
      s.cuda ? "CUDA device-to-device copy on device 0 (the data is there too)"
             : "parallel non-temporal copy");
  std::printf("%-30s %-8s %-7s %9s %9s %8s %8s %7s %10s %7s\n", "case", "mode", "variant", "min ms",
              "median ms", "GB/s", "probe", "% probe", "heap KiB", "x plain");
  std::fflush(stdout);  // (through a pipe too: each row appears as it is measured)
  std::vector<Result> all;
  int unsteady = 0;
  try {
    for (std::size_t i = 0; i < s.cases.size(); ++i) {
      const Case& c = s.cases[i];
      if (s.cases.size() > 1) {  // progress on stderr, out of the way of the table and the CSV
        std::fprintf(stderr, "[%zu/%zu] %s ...\r", i + 1, s.cases.size(), c.label.c_str());
        std::fflush(stderr);
      }
      for (const Result& r : run_case(c, s)) {
        const std::string heap =
            kHeapTracked ? std::to_string((r.heap_bytes + 1023) / 1024) : std::string("n/a");
        char versus[16] = "";
        if (r.versus_plain > 0) std::snprintf(versus, sizeof versus, "%.2f", r.versus_plain);
        const bool steady = r.probe_spread <= kSteadyProbeSpread;
        unsteady += !steady;
        std::printf("%-30s %-8s %-7s %9.3f %9.3f %8.1f %8.1f %6.0f%%%s %9s %7s\n", r.label.c_str(),
                    r.mode.c_str(), r.variant.c_str(), r.min_ms, r.median_ms, r.gbps, r.probe_gbps,
                    r.percent, steady ? " " : "!", heap.c_str(), versus);
        std::fflush(stdout);
        all.push_back(r);
      }
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "batchnorm-bench: %s\n", error.what());
    return 1;
  }
  if (unsteady) {
    std::printf(
        "\n! %d row(s): the probe's time varied by more than %.0f%% over the rounds (the memory "
        "system changed under the run: other processes, frequency), so their %% probe is "
        "unreliable; rerun on a quieter machine or with more --reps.\n",
        unsteady, 100 * kSteadyProbeSpread);
  }
  if (!s.csv.empty()) {
    std::ofstream file;
    if (s.csv != "-") file.open(s.csv);
    std::ostream& out = s.csv == "-" ? std::cout : file;
    out << "case,mode,variant,dtype,threads,isa,min_ms,median_ms,gbps,probe_gbps,percent_of_probe,"
           "heap_bytes,max_rel_error,versus_plain,probe_spread\n";
    for (const Result& r : all) {
      out << '"' << r.label << "\"," << r.mode << ',' << r.variant << ',' << dtype_text(s.dtype)
          << ',' << threads << ',' << batchnorm::cpu::isa_name(batchnorm::cpu::active_isa()) << ','
          << r.min_ms << ',' << r.median_ms << ',' << r.gbps << ',' << r.probe_gbps << ','
          << r.percent << ',' << (kHeapTracked ? std::to_string(r.heap_bytes) : "") << ','
          << r.error << ',' << (r.versus_plain > 0 ? std::to_string(r.versus_plain) : "") << ','
          << r.probe_spread << '\n';
    }
  }
  return 0;
}
