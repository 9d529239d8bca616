// The CUDA backend: the layer operations as kernel sequences on the calling thread's stream
// (batchnorm::set_cuda_stream), on the device that holds the weights. The backend's one
// translation unit with device code: the kernels and their launchers are instantiated here, for
// the element types of core/elements.hpp. Per-call scratch memory
// comes from batchnorm's stream-ordered pool (cuda::scratch_pool). Every operation returns once
// its work is queued: the training statistics stay on the device (CudaStatistics), where the
// backward reads them, and reach the host only through statistics_to_host().
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/synchronize.hpp"
#include "cuda/launchers.cuh"
#include "cuda/runtime.hpp"

namespace batchnorm::detail {

namespace {

using cuda::check;
using cuda::Geometry;
using cuda::Sums;

// Scratch memory of one call, freed in stream order when the call's work is done.
class Workspace {
 public:
  explicit Workspace(cudaStream_t stream) : stream_(stream) {}
  ~Workspace() {
    if (base_) cudaFreeAsync(base_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // Runs `layout` once to size the pieces it takes, allocates, then again to hand them out.
  template <class Layout>
  auto carve(Layout layout) {
    Cutter sizing{nullptr};
    layout(sizing);
    if (sizing.used > 0) {
      check(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&base_), sizing.used,
                                    cuda::scratch_pool(), stream_),
            "allocating scratch memory");
    }
    Cutter cutting{base_};
    return layout(cutting);
  }

  struct Cutter {
    char* base;
    std::size_t used = 0;
    template <class P>
    P* take(std::int64_t count) {
      P* piece = base ? reinterpret_cast<P*>(base + used) : nullptr;
      const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(P);
      used += (bytes + 255) / 256 * 256;  // keep every piece aligned for vector access
      return piece;
    }
  };

 private:
  cudaStream_t stream_;
  char* base_ = nullptr;
};

template <class P>
void to_device(P* device, const std::vector<P>& host, cudaStream_t stream) {
  if (host.empty()) return;
  check(
      cudaMemcpyAsync(device, host.data(), host.size() * sizeof(P), cudaMemcpyHostToDevice, stream),
      "copying statistics to the device");
}

template <class P>
std::vector<P> to_host(const P* device, std::size_t count, cudaStream_t stream) {
  std::vector<P> host(count);
  if (count == 0) return host;
  check(cudaMemcpyAsync(host.data(), device, count * sizeof(P), cudaMemcpyDeviceToHost, stream),
        "copying statistics to the host");
  check(cudaStreamSynchronize(stream), "waiting for the statistics");
  return host;
}

std::vector<double> slice(const std::vector<double>& values, std::size_t first, std::size_t n) {
  return std::vector<double>(values.begin() + static_cast<std::ptrdiff_t>(first),
                             values.begin() + static_cast<std::ptrdiff_t>(first + n));
}

// A training call's statistics in device memory, [count | mean | inv_std | zscale | zshift],
// with the events that mark them written and last read. Backward waits for the forward's event
// on its own stream (which may differ from the forward's). Where the caller provides the memory
// (TrainingContext::device_storage) nothing is allocated or freed: what a CUDA graph capture of
// a training step needs. Otherwise the block comes from the stream-ordered pool, so a training
// step queues no allocation that waits for the device, and is freed in stream order after the
// last backward that read it.
class CudaStatistics final : public DeviceStatistics {
 public:
  CudaStatistics(std::int64_t stats, std::int64_t features, double* storage, cudaStream_t stream)
      : stats_(stats), features_(features), data_(storage), owned_(storage == nullptr) {
    check(cudaGetDevice(&device_), "cudaGetDevice");
    cudaError_t status = cudaEventCreateWithFlags(&written_, cudaEventDisableTiming);
    if (status == cudaSuccess && owned_) {
      status = cudaEventCreateWithFlags(&read_, cudaEventDisableTiming);
    }
    if (status == cudaSuccess && owned_) {
      status = cudaMallocFromPoolAsync(reinterpret_cast<void**>(&data_), size() * sizeof(double),
                                       cuda::scratch_pool(), stream);
    }
    if (status != cudaSuccess) {
      release();
      check(status, "allocating the training statistics");
    }
  }
  ~CudaStatistics() override { release(); }
  CudaStatistics(const CudaStatistics&) = delete;
  CudaStatistics& operator=(const CudaStatistics&) = delete;

  static std::size_t size(std::int64_t stats, std::int64_t features) {
    return static_cast<std::size_t>(3 * stats + 2 * features);
  }
  std::size_t size() const { return size(stats_, features_); }
  // The block starts with count; backward finds the others at the same offsets as in its own
  // upload of host statistics.
  double* count() const { return data_; }
  double* inv_std() const { return data_ + 2 * stats_; }

  void mark_written(cudaStream_t stream) {
    check(cudaEventRecord(written_, stream), "recording the training statistics");
    written_recorded_ = true;
  }
  // Orders a backward on `stream` after the forward and, for a block of our own, after any
  // earlier backward of this context (so that the last read is the last one recorded, for the
  // release). A wait for an event never recorded would stop a graph capture: none is queued
  // (statistics rebuilt from the caller's memory are ordered by the caller's stream).
  void begin_read(cudaStream_t stream) const {
    if (written_recorded_) {
      check(cudaStreamWaitEvent(stream, written_, 0), "waiting for the training statistics");
    }
    if (read_recorded_) {
      check(cudaStreamWaitEvent(stream, read_, 0), "waiting for the training statistics");
    }
  }
  void end_read(cudaStream_t stream) const {
    if (!owned_) return;
    check(cudaEventRecord(read_, stream), "recording the training statistics' use");
    read_recorded_ = true;
  }

  void to_host(TrainingContext& context) const override {
    const cuda::DeviceScope scope(device_);
    std::vector<double> block(size());
    if (written_recorded_) {
      check(cudaEventSynchronize(written_), "waiting for the training statistics");
    } else {
      check(cudaStreamSynchronize(cuda::current_stream()), "waiting for the training statistics");
    }
    check(cudaMemcpy(block.data(), data_, block.size() * sizeof(double), cudaMemcpyDeviceToHost),
          "copying the training statistics to the host");
    const auto n = static_cast<std::size_t>(stats_), f = static_cast<std::size_t>(features_);
    context.count = slice(block, 0, n);
    context.mean = slice(block, n, n);
    context.inv_std = slice(block, 2 * n, n);
    context.zscale = slice(block, 3 * n, f);
    context.zshift = slice(block, 3 * n + f, f);
  }

 private:
  // Frees a block of our own on a stream of batchnorm's own once the forward that wrote it and
  // the last backward that read it are done; never waits on the host. Not the legacy stream: a
  // graph capture in progress on another stream forbids work that synchronizes with it.
  void release() noexcept {
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess && previous != device_) cudaSetDevice(device_);
    if (owned_ && data_) {
      cudaStream_t stream = nullptr;
      if (cuda::release_stream(&stream)) {
        if (written_) cudaStreamWaitEvent(stream, written_, 0);
        if (read_recorded_) cudaStreamWaitEvent(stream, read_, 0);
        cudaFreeAsync(data_, stream);
      }
    }
    if (written_) cudaEventDestroy(written_);
    if (read_) cudaEventDestroy(read_);
    if (previous != device_) cudaSetDevice(previous);
    cudaGetLastError();
  }

  std::int64_t stats_, features_;
  int device_ = 0;
  double* data_ = nullptr;
  bool owned_;
  cudaEvent_t written_ = nullptr;
  cudaEvent_t read_ = nullptr;
  bool written_recorded_ = false;
  mutable bool read_recorded_ = false;
};

// The caller's memory for the kept statistics (TrainingContext::device_storage), checked; null
// where none is given.
double* statistics_storage(const TrainingContext& context, int device, std::int64_t stats,
                           std::int64_t features) {
  if (!context.device_storage) return nullptr;
  const std::size_t needed = CudaStatistics::size(stats, features);
  if (context.device_storage_size < needed ||
      reinterpret_cast<std::uintptr_t>(context.device_storage) % alignof(double) != 0) {
    throw std::invalid_argument("batchnorm (CUDA): the statistics storage must hold " +
                                std::to_string(needed) + " aligned doubles, got " +
                                std::to_string(context.device_storage_size));
  }
  cuda::check_operands(device, {{context.device_storage, needed > 0, "the statistics storage"}});
  return context.device_storage;
}

// Checks a call's arrays before any of its work is queued (cuda::check_operands): the data
// arrays (`data`, nothing read when the tensor is empty) and the per-feature vectors (absent
// ones null), all on the device of the weights, current in `scope`.
template <class W>
void check_arrays(const cuda::DeviceScope& scope, std::int64_t elements,
                  std::initializer_list<std::pair<const void*, const char*>> data,
                  std::int64_t features, const WeightPtrs<W>& w,
                  std::initializer_list<std::pair<const void*, const char*>> vectors = {}) {
  cuda::check_earlier_errors();
  const auto datum = [&](const std::pair<const void*, const char*>& a) {
    return cuda::Operand{a.first, elements > 0 && a.first != nullptr, a.second};
  };
  const auto vector = [&](const void* pointer, const char* name) {
    return cuda::Operand{pointer, features > 0 && pointer != nullptr, name};
  };
  for (const auto& a : data) cuda::check_operands(scope.device(), {datum(a)});
  cuda::check_operands(
      scope.device(),
      {vector(w.gamma, "gamma"), vector(w.beta, "beta"), vector(w.moving_mean, "moving_mean"),
       vector(w.moving_variance, "moving_variance"), vector(w.moving_stddev, "moving_stddev"),
       vector(w.renorm_mean, "renorm_mean"), vector(w.renorm_stddev, "renorm_stddev"),
       vector(w.adjust_scale, "the adjustment scale"),
       vector(w.adjust_bias, "the adjustment bias")});
  for (const auto& v : vectors) cuda::check_operands(scope.device(), {vector(v.first, v.second)});
}

std::int64_t elements(const Plan& plan) { return plan.stat.total() * plan.reduced.total(); }

// The CUDA backend: each operation as kernels queued on the calling thread's stream.
struct Cuda {
  static bool available() { return cuda::device_count() > 0; }

  template <class T>
  static void run(const TrainForward<T>& call) {
    using W = compute_t<T>;
    const cuda::DeviceScope scope(call.weights.moving_mean, "moving_mean");
    check_arrays(scope, elements(call.apply_plan),
                 {{call.x, "x"}, {call.y, "y"}, {call.mask, "mask"}}, call.stats_plan.features,
                 call.weights);
    const cudaStream_t stream = cuda::current_stream();
    const std::int64_t groups = call.stats_plan.groups, features = call.stats_plan.features;
    const std::int64_t stats = groups * features;
    double* const storage = statistics_storage(call.context, scope.device(), stats, features);
    const void* stats_operands[] = {call.x, call.mask};
    const Geometry stats_geo =
        cuda::make_geometry(call.stats_plan, sizeof(T), stats_operands, call.mask ? 1 : -1);
    const void* apply_operands[] = {call.x, call.y};
    const Geometry apply_geo = cuda::make_geometry(call.apply_plan, sizeof(T), apply_operands, -1);

    // The statistics block [count | mean | var | inv_std | zscale | zshift], computed in scratch.
    const std::size_t context_size = static_cast<std::size_t>(4 * stats + 2 * features);
    struct Pieces {
      Moments* partial;
      double* block;
      GhostSums* ghost;
      Coefficients<W> k;
    };
    Workspace workspace(stream);
    const Pieces p = workspace.carve([&](Workspace::Cutter& cut) {
      Pieces pieces;
      pieces.partial = cut.take<Moments>(stats * stats_geo.chunks);
      pieces.block = cut.take<double>(static_cast<std::int64_t>(context_size));
      pieces.ghost = cut.take<GhostSums>(features);
      pieces.k = {cut.take<W>(stats), cut.take<W>(stats), nullptr, cut.take<W>(stats)};
      return pieces;
    });
    double* count = p.block;
    double* mean = count + stats;
    double* var = mean + stats;
    double* inv_std = var + stats;
    double* zscale = inv_std + stats;
    double* zshift = zscale + features;
    const GroupStats group_stats{count, mean, var, inv_std, zscale, zshift};

    cuda::launch_moments(call.stats_plan, stats_geo, call.x, call.mask, p.partial, stream);
    cuda::launch_merge_moments(p.partial, stats, stats_geo.chunks, count, mean, var, stream);
    if (!synchronizing(call.communicator)) {
      cuda::launch_train_coefficients<W>(features, groups, call.scalars, group_stats, call.weights,
                                         p.k, stream);
    } else {
      // As the CPU backend: whole-batch statistics merge across processes, while ghost batches
      // stay per process and only their per-feature sums do. The few values cross the host.
      if (!call.context.ghost_batches) {
        const auto n = static_cast<std::size_t>(stats);
        const std::vector<double> local = to_host(count, 3 * n, stream);
        std::vector<double> c = slice(local, 0, n), m = slice(local, n, n),
                            v = slice(local, 2 * n, n);
        synchronize_moments(call.communicator, c, m, v);
        c.insert(c.end(), m.begin(), m.end());
        c.insert(c.end(), v.begin(), v.end());
        to_device(count, c, stream);
      }
      cuda::launch_group_statistics(features, groups, call.scalars.epsilon, group_stats, p.ghost,
                                    stream);
      if (call.context.ghost_batches) {
        std::vector<GhostSums> ghost = to_host(p.ghost, static_cast<std::size_t>(features), stream);
        synchronize_ghost_sums(call.communicator, ghost);
        to_device(p.ghost, ghost, stream);
      }
      cuda::launch_feature_coefficients<W>(features, groups, call.scalars, group_stats, p.ghost,
                                           call.weights, p.k, stream);
    }
    cuda::launch_affine<T, W>(call.apply_plan, apply_geo, call.x, call.y, p.k.shift, p.k.scale,
                              p.k.offset, stream);

    // The statistics backward needs stay on the device: two copies in stream order (the block
    // holds the variance between the means and inv_std, which backward does not read).
    auto kept = std::make_shared<CudaStatistics>(stats, features, storage, stream);
    const std::size_t doubles = sizeof(double);
    check(cudaMemcpyAsync(kept->count(), count, static_cast<std::size_t>(2 * stats) * doubles,
                          cudaMemcpyDeviceToDevice, stream),
          "keeping the training statistics");
    check(cudaMemcpyAsync(kept->inv_std(), inv_std,
                          static_cast<std::size_t>(stats + 2 * features) * doubles,
                          cudaMemcpyDeviceToDevice, stream),
          "keeping the training statistics");
    kept->mark_written(stream);
    call.context.groups = groups;
    call.context.features = features;
    for (std::vector<double>* host :
         {&call.context.count, &call.context.mean, &call.context.inv_std, &call.context.zscale,
          &call.context.zshift}) {
      host->clear();
    }
    call.context.device = std::move(kept);
    call.context.has_mask = call.mask != nullptr;
  }

  template <class T>
  static void run(const InferForward<T>& call) {
    using W = compute_t<T>;
    const cuda::DeviceScope scope(call.weights.moving_mean, "moving_mean");
    check_arrays(scope, elements(call.plan), {{call.x, "x"}, {call.y, "y"}}, call.plan.features,
                 call.weights);
    const cudaStream_t stream = cuda::current_stream();
    const void* operands[] = {call.x, call.y};
    const Geometry geo = cuda::make_geometry(call.plan, sizeof(T), operands, -1);
    const std::int64_t features = call.plan.features;
    Workspace workspace(stream);
    const Coefficients<W> k = workspace.carve([&](Workspace::Cutter& cut) {
      return Coefficients<W>{cut.take<W>(features), cut.take<W>(features), nullptr,
                             cut.take<W>(features)};
    });
    cuda::launch_inference_coefficients<W>(features, call.epsilon, call.weights, k, stream);
    cuda::launch_affine<T, W>(call.plan, geo, call.x, call.y, k.shift, k.scale, k.offset, stream);
  }

  template <class T>
  static void run(const TrainBackward<T>& call) {
    using W = compute_t<T>;
    const cuda::DeviceScope scope(call.weights.moving_mean, "moving_mean");
    check_arrays(scope, elements(call.dx_plan),
                 {{call.dy, "dy"}, {call.x, "x"}, {call.dx, "dx"}, {call.mask, "mask"}},
                 call.context.features, call.weights,
                 {{call.dgamma, "dgamma"}, {call.dbeta, "dbeta"}});
    const cudaStream_t stream = cuda::current_stream();
    const std::int64_t groups = call.context.groups, features = call.context.features;
    const std::int64_t stats = groups * features;
    const void* sums_operands[] = {call.dy, call.x};
    const Geometry sums_geo = cuda::make_geometry(call.sums_plan, sizeof(T), sums_operands, -1);
    const void* dx_operands[] = {call.dy, call.x, call.dx, call.mask};
    const Geometry dx_geo =
        cuda::make_geometry(call.dx_plan, sizeof(T), dx_operands, call.mask ? 3 : -1);

    // The statistics of a CUDA forward are on the device already; host ones (a context the CPU
    // backend made) go up in one copy, in the same layout [count | mean | inv_std | zscale |
    // zshift].
    const auto* stored = dynamic_cast<const CudaStatistics*>(call.context.device.get());
    std::vector<double> block;
    if (stored) {
      stored->begin_read(stream);
    } else {
      block = call.context.count;
      block.insert(block.end(), call.context.mean.begin(), call.context.mean.end());
      block.insert(block.end(), call.context.inv_std.begin(), call.context.inv_std.end());
      block.insert(block.end(), call.context.zscale.begin(), call.context.zscale.end());
      block.insert(block.end(), call.context.zshift.begin(), call.context.zshift.end());
    }
    struct Pieces {
      double* block;
      Sums* partial;
      double* sums;
      ParameterSums* totals;
      Coefficients<W> k;
    };
    Workspace workspace(stream);
    const Pieces p = workspace.carve([&](Workspace::Cutter& cut) {
      Pieces pieces;
      pieces.block = cut.take<double>(static_cast<std::int64_t>(block.size()));
      pieces.partial = cut.take<Sums>(stats * sums_geo.chunks);
      pieces.sums = cut.take<double>(2 * stats);
      pieces.totals = cut.take<ParameterSums>(features);
      pieces.k = {cut.take<W>(stats), cut.take<W>(stats), cut.take<W>(stats), cut.take<W>(stats)};
      return pieces;
    });
    to_device(p.block, block, stream);
    const double* count = stored ? stored->count() : p.block;
    const double* mean = count + stats;
    const double* inv_std = mean + stats;
    const double* zscale = inv_std + stats;
    const double* zshift = zscale + features;
    double* sum_dy = p.sums;
    double* sum_dy_centered = p.sums + stats;
    const BackwardSums sums{sum_dy, sum_dy_centered};

    cuda::launch_backward_sums(call.sums_plan, sums_geo, call.dy, call.x, mean, p.partial, stream);
    cuda::launch_merge_sums(p.partial, stats, sums_geo.chunks, sum_dy, sum_dy_centered, stream);
    // As the CPU backend: without ghost batches dx needs the global sums; with them dx uses this
    // process's ghost batches and only the dgamma/dbeta totals are synchronized.
    const bool sync = synchronizing(call.communicator);
    if (sync && !call.context.ghost_batches) {
      const auto n = static_cast<std::size_t>(stats);
      const std::vector<double> local = to_host(p.sums, 2 * n, stream);
      std::vector<double> s = slice(local, 0, n), sc = slice(local, n, n);
      synchronize_sums(call.communicator, s, sc);
      s.insert(s.end(), sc.begin(), sc.end());
      to_device(p.sums, s, stream);
    }
    if (!(sync && call.context.ghost_batches)) {
      cuda::launch_train_backward_coefficients<W>(features, groups, count, mean, inv_std, zscale,
                                                  zshift, call.weights.gamma, sums, call.dgamma,
                                                  call.dbeta, p.k, stream);
    } else {
      cuda::launch_backward_coefficients<W>(features, groups, count, mean, inv_std, zscale,
                                            call.weights.gamma, sums, p.totals, p.k, stream);
      std::vector<ParameterSums> totals =
          to_host(p.totals, static_cast<std::size_t>(features), stream);
      std::vector<double> total_dy, total_dy_xhat;
      for (const ParameterSums& t : totals) {
        total_dy.push_back(t.dy);
        total_dy_xhat.push_back(t.dy_xhat);
      }
      synchronize_sums(call.communicator, total_dy, total_dy_xhat);
      for (std::size_t c = 0; c < totals.size(); ++c) totals[c] = {total_dy[c], total_dy_xhat[c]};
      to_device(p.totals, totals, stream);
      cuda::launch_parameter_gradients<W>(features, zscale, zshift, p.totals, call.dgamma,
                                          call.dbeta, stream);
    }
    cuda::launch_backward_dx<T, W>(call.dx_plan, dx_geo, call.dy, call.x, call.mask, call.dx, p.k,
                                   stream);
    if (stored) stored->end_read(stream);
  }

  template <class T>
  static void run(const InferBackward<T>& call) {
    using W = compute_t<T>;
    const cuda::DeviceScope scope(call.weights.moving_mean, "moving_mean");
    check_arrays(scope, elements(call.dx_plan), {{call.dy, "dy"}, {call.x, "x"}, {call.dx, "dx"}},
                 call.sums_plan.features, call.weights,
                 {{call.dgamma, "dgamma"}, {call.dbeta, "dbeta"}});
    const cudaStream_t stream = cuda::current_stream();
    const std::int64_t features = call.sums_plan.features;
    const void* sums_operands[] = {call.dy, call.x};
    const Geometry sums_geo = cuda::make_geometry(call.sums_plan, sizeof(T), sums_operands, -1);
    const void* dx_operands[] = {call.dy, call.x, call.dx};
    const Geometry dx_geo = cuda::make_geometry(call.dx_plan, sizeof(T), dx_operands, -1);
    struct Pieces {
      Sums* partial;
      double* sums;
      Coefficients<W> k;
    };
    Workspace workspace(stream);
    const Pieces p = workspace.carve([&](Workspace::Cutter& cut) {
      Pieces pieces;
      pieces.partial = cut.take<Sums>(features * sums_geo.chunks);
      pieces.sums = cut.take<double>(2 * features);
      pieces.k = {cut.take<W>(features), cut.take<W>(features), cut.take<W>(features),
                  cut.take<W>(features)};
      return pieces;
    });
    double* sum_dy = p.sums;
    double* sum_dy_centered = p.sums + features;
    const W* moving_mean = call.weights.moving_mean;
    cuda::launch_backward_sums(call.sums_plan, sums_geo, call.dy, call.x, moving_mean, p.partial,
                               stream);
    cuda::launch_merge_sums(p.partial, features, sums_geo.chunks, sum_dy, sum_dy_centered, stream);
    cuda::launch_inference_backward_coefficients<W>(features, call.epsilon, call.weights,
                                                    BackwardSums{sum_dy, sum_dy_centered},
                                                    call.dgamma, call.dbeta, p.k, stream);
    cuda::launch_backward_dx<T, W>(call.dx_plan, dx_geo, call.dy, call.x, nullptr, call.dx, p.k,
                                   stream);
  }
};

constexpr Backend kCuda = Backend::of<Cuda>();

}  // namespace

const Backend& cuda_backend() { return kCuda; }

}  // namespace batchnorm::detail

namespace batchnorm::cuda {

std::shared_ptr<const DeviceStatistics> statistics_in(double* storage, std::int64_t groups,
                                                      std::int64_t features) {
  const DeviceScope scope(storage, "the statistics storage");
  return std::make_shared<detail::CudaStatistics>(groups * features, features, storage, nullptr);
}

}  // namespace batchnorm::cuda
