// Public C++ API of batchnorm: Keras-exact batch normalization over strided tensors.
// Free functions work on raw strided views (for framework authors who own their buffers);
// no backend header is included here, so this compiles without OpenMP or CUDA.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace batchnorm {

inline constexpr int kMaxRank = 8;

enum class DType : std::uint8_t { float16, bfloat16, float32, float64, boolean };

// Device types by their DLPack codes, so an array's DLPack device maps onto one without a table.
enum class DeviceType : std::int32_t { cpu = 1, cuda = 2 };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
};

// Name of a dtype as NumPy spells it ("float32", "bfloat16", ...), for error messages.
const char* dtype_name(DType dtype);

// Bytes per element of a dtype (4 for float32, 2 for float16 and bfloat16, 1 for bool, ...).
std::size_t dtype_size(DType dtype);

// A non-owning strided view. Strides count elements, not bytes, and may be zero or negative.
struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::float32;
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};
  Device device{};

  std::int64_t numel() const;
};

// A contiguous C-order view of `shape` at `data`.
TensorRef contiguous_view(void* data, DType dtype, const std::vector<std::int64_t>& shape,
                          Device device = {});

// Layer hyper-parameters, as in Keras' BatchNormalization. Besides the feature axes, every
// option is a scalar listed once here, as (type, name, default); the struct, the Python binding
// and the Python options read the list, so a new option is one line here plus its validation
// (batchnorm::validate) and its formula.
//   momentum, epsilon     the moving-average momentum and the variance epsilon
//   center, scale         whether the layer has beta / gamma
//   renorm, renorm_momentum
//                         batch renormalization and the momentum of its statistics
//   rmin, rmax, dmax      renorm clipping: r is clipped to [rmin, rmax] and d to [-dmax, dmax];
//                         the infinite defaults mean "no bound", as a key missing from Keras'
//                         renorm_clipping dict
//   virtual_batch_size    ghost-batch size (0 = off); the batch axis 0 must be a multiple of it
#define BATCHNORM_SCALAR_OPTIONS(X)                         \
  X(double, momentum, 0.99)                                 \
  X(double, epsilon, 1e-3)                                  \
  X(bool, center, true)                                     \
  X(bool, scale, true)                                      \
  X(bool, renorm, false)                                    \
  X(double, renorm_momentum, 0.99)                          \
  X(double, rmin, -std::numeric_limits<double>::infinity()) \
  X(double, rmax, std::numeric_limits<double>::infinity())  \
  X(double, dmax, std::numeric_limits<double>::infinity())  \
  X(std::int64_t, virtual_batch_size, 0)

struct Options {
  // Feature axes; negative values count from the end. Resolved against the input rank.
  std::vector<int> axes{-1};
#define BATCHNORM_OPTION_FIELD(type, name, default_value) type name = default_value;
  BATCHNORM_SCALAR_OPTIONS(BATCHNORM_OPTION_FIELD)
#undef BATCHNORM_OPTION_FIELD
};

// Checks every option against its range and throws std::invalid_argument naming the first one
// outside it; `with_adjustment`: the calls will pass an Adjustment (which ghost batches exclude).
// The one home of these rules: the entry points and both layer classes (C++ and Python) call
// it, so each rule and message exists once.
void validate(const Options& options, bool with_adjustment = false);

// What a layer with `options` holds for inputs of `input_shape` (the batch size and other
// non-feature sizes are not used and may be -1): the resolved feature axes (ascending), their
// sizes, the feature count C, Keras' shape of every weight ((C,) for one feature axis; for
// several, the input's rank with the feature sizes on the feature axes and 1 elsewhere) and the
// weights' names in Keras order (get_weights / set_weights order). Validates `options` and the
// axes against the shape.
struct WeightSchema {
  std::vector<int> axes;
  std::vector<std::int64_t> feature_shape;
  std::int64_t features = 1;
  std::vector<std::int64_t> weight_shape;
  std::vector<std::string> names;
};
WeightSchema weight_schema(const Options& options, const std::vector<std::int64_t>& input_shape);

// The dtype of the weights for data of `data`: float64 for float64 data, float32 otherwise
// (16-bit data computes in float32).
DType weight_dtype(DType data);

// Per-feature vectors of length C (the product of the feature-axis sizes, C order over the
// feature axes), contiguous, all of `dtype` (float32 for 16/32-bit data, float64 for float64
// data) on the data's device. gamma/beta may be null (scale=False / center=False). The three
// renorm vectors are needed only when Options::renorm is set.
struct Weights {
  void* gamma = nullptr;
  void* beta = nullptr;
  void* moving_mean = nullptr;
  void* moving_variance = nullptr;
  void* moving_stddev = nullptr;
  void* renorm_mean = nullptr;
  void* renorm_stddev = nullptr;
  DType dtype = DType::float32;
  Device device{};
};

// The names of the weights a layer with `options` has, in Keras order (center/scale/renorm
// decide which exist).
std::vector<std::string> weight_names(const Options& options);

// The member of `weights` that holds the weight called `name` (Keras' names, as above), or
// nullptr for a name that is no weight.
void** weight_slot(Weights& weights, std::string_view name);

// The same by position, for code that indexes the weights rather than naming them: every weight a
// layer can have, in the order of Weights' members (weight_names' order), index < kWeightCount.
inline constexpr int kWeightCount = 7;
void** weight_slot(Weights& weights, int index);
const char* weight_name(int index);

// Optional training-time adjustment (Keras' `adjustment`): per-feature scale and bias vectors
// with the same dtype/device rules as Weights.
struct Adjustment {
  const void* scale = nullptr;
  const void* bias = nullptr;
};

struct TrainingContext;

// Statistics that a backend keeps on its device (the CUDA backend): its backward reads them
// there, and nothing crosses to the host unless asked for (statistics_to_host).
class DeviceStatistics {
 public:
  virtual ~DeviceStatistics() = default;
  // Copies the statistics into the context's host vectors (waits for them to be computed).
  virtual void to_host(TrainingContext& context) const = 0;
};

// What a training forward pass keeps for its backward pass: per (ghost group g, feature c)
// statistics at index g * features + c, and per-feature renorm/adjustment factors. The backend
// owns where they live: the CPU backend fills the host vectors; the CUDA backend keeps them on
// the device (`device`), leaves the vectors empty, and statistics_to_host() fills them.
struct TrainingContext {
  std::int64_t groups = 0;
  std::int64_t features = 0;
  std::vector<double> count;    // valid positions in the group
  std::vector<double> mean;     // batch mean used for the output (0 where count == 0)
  std::vector<double> inv_std;  // 1 / sqrt(var + epsilon)
  std::vector<double> zscale;   // r * adjustment scale (per feature)
  std::vector<double> zshift;   // d * adjustment scale + adjustment bias (per feature)
  bool has_mask = false;
  // Options::virtual_batch_size was set: with a communicator, ghost batches stay per process and
  // only their averages (moving statistics, renorm) and dgamma/dbeta are synchronized.
  bool ghost_batches = false;
  std::shared_ptr<const DeviceStatistics> device;  // set where the statistics stay on a device
  // Optional memory for the statistics a CUDA training forward keeps, owned by the caller:
  // device memory of the weights' device, 8-byte aligned, at least 3 * groups * features +
  // 2 * features doubles (the layout of the packed statistics), kept alive until the last
  // backward of this context has run. With it, a training forward and backward allocate and
  // free nothing that outlives their own call, so a CUDA graph can capture the step (the memory
  // then belongs to the graph's replays). Null: the backend allocates and frees the statistics.
  double* device_storage = nullptr;
  std::size_t device_storage_size = 0;  // doubles
};

// Fills the host vectors of a context whose statistics stayed on the device; does nothing for a
// context the CPU backend made.
void statistics_to_host(TrainingContext& context);

// Cross-process reduction for synchronized statistics (Keras' synchronized=True). Plug in MPI,
// NCCL or any transport: `allgather` must gather `count` doubles from every one of the `size`
// processes into `receive` (size * count values, in rank order); batchnorm/mpi.hpp makes one
// from an MPI communicator. Every process then merges the contributions in rank order, so all
// of them get bitwise the same statistics. It is called once per training forward (3 values
// per feature) and once per training backward (2 per feature); every process must make the
// same sequence of calls with the same feature count, or the collectives mismatch.
// Without ghost batches the statistics, dx, dgamma and dbeta are those of the global batch.
// With ghost batches each process normalizes its own ghost batches (no data crosses processes
// for them); the average over all processes' ghost batches feeds the moving statistics and
// renorm, and dgamma/dbeta are summed over all processes.
struct Communicator {
  int size = 1;
  std::function<void(const double* send, double* receive, std::size_t count)> allgather;
};

// Training forward: y = ((x - mean) / sqrt(var + eps) * r + d) * a_s + a_b) * gamma + beta with
// the batch (or ghost-batch, masked) statistics, and the Keras moving-statistics update applied
// in place to `weights` when `update_moving` is set. `mask` (nullable) is a boolean view with
// x's shape (stride 0 on the feature axes for broadcasting); only valid positions feed the
// statistics. Statistics accumulate in float64 from per-block shifted sums merged by Chan's
// formula in a fixed order: results are bitwise identical for every thread count.
void train_forward(const TensorRef& x, const TensorRef& y, const TensorRef* mask,
                   const Options& options, const Weights& weights, const Adjustment* adjustment,
                   bool update_moving, TrainingContext& context,
                   const Communicator* communicator = nullptr);

// Inference: y = (x - moving_mean) * gamma / sqrt(moving_variance + eps) + beta, computed in
// float32 (float64 for float64 data). Elementwise, so trivially deterministic.
void infer_forward(const TensorRef& x, const TensorRef& y, const Options& options,
                   const Weights& weights);

// Backward of train_forward (renorm r/d and adjustment held constant, as in Keras): writes dx
// and, where non-null, dgamma/dbeta (weights' dtype, length C). The reductions sum in float64
// in a fixed order (deterministic); `x` and `mask` must be those of the forward call. Of the
// weights it reads gamma only (and whether beta exists); the moving statistics may be absent.
void train_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                    const TensorRef* mask, const Options& options, const Weights& weights,
                    const TrainingContext& context, void* dgamma, void* dbeta,
                    const Communicator* communicator = nullptr);

// Backward of infer_forward: dx = dy * gamma / sqrt(moving_variance + eps),
// dgamma = sum(dy * (x - moving_mean)) / sqrt(moving_variance + eps), dbeta = sum(dy).
void infer_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                    const Options& options, const Weights& weights, void* dgamma, void* dbeta);

// Whether this build carries the CUDA backend and a CUDA device is visible. Never throws: a
// machine without driver or GPU gives false.
bool cuda_available();

// What this build and machine give the kernels: for `python -m batchnorm` and bug reports.
struct RuntimeInfo {
  std::string cpu_instruction_set;  // baseline, avx2 or avx512: picked at run time
  int cpu_threads = 1;              // OpenMP's team size for a call (1 without OpenMP)
  bool cuda_built = false;          // this build carries the CUDA backend
  int cuda_devices = 0;             // usable CUDA devices (0 without driver or GPU)
};
RuntimeInfo runtime_info();

// The CUDA stream (a cudaStream_t; nullptr = the legacy default stream) on which the calling
// thread's later CUDA calls queue their work, like a framework's "current stream"; each thread
// has its own. CUDA calls run on the device that holds the weights and return once their work
// is queued (the training statistics stay on the device); only calls with a communicator of
// size > 1 wait on the host, for the statistics they exchange.
void set_cuda_stream(void* stream);
void* cuda_stream();

// Number of features C for `shape` and `options.axes` (validates the axes).
std::int64_t feature_count(const std::vector<std::int64_t>& shape, const Options& options);
// The same for a tensor's shape.
std::int64_t feature_count(const TensorRef& x, const Options& options);

}  // namespace batchnorm

// The stateful layer class, BatchNormalization<T>, built on the functions above.
#include "batchnorm/layer.hpp"
