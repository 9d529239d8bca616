// Who changes a layer's weights now, across threads: the kernels run without the GIL, so Python
// threads calling one layer overlap.
//
// Writers (a training call, which updates the moving statistics in place, or a change of the
// weights) hold a mutex and keep `version` odd while they work. Readers (inference calls, weight
// snapshots) take no lock: they note an even version, read, and read again where the version
// changed meanwhile, so that no snapshot mixes two steps and no inference result comes from a
// half-updated statistic. Two training calls of one layer at once are refused: the layer keeps
// one call's context for backward, so their steps could not be told apart.
//
// It lives in C++ so that the layer's plain call (operations.cpp) takes and gives back its part
// within its one call into the extension.
#pragma once

#include <nanobind/nanobind.h>

#include <atomic>
#include <cstdint>
#include <mutex>

namespace batchnorm::python {

class WeightAccess {
 public:
  std::uint64_t version() const { return version_.load(); }

  // The version when no writer is at work, waiting for one that is (without the GIL).
  std::uint64_t stable_version();

  // Takes the writer's part, waiting without the GIL for another writer. RuntimeError (naming
  // the layer, `name`) where this is a training call and another thread's training call has it.
  void begin_write(bool training, nanobind::handle name);
  // Gives it back; the GIL need not be held.
  void end_write();

 private:
  std::mutex mutex_;
  std::atomic<std::uint64_t> version_{0};
  std::atomic<bool> training_{false};  // whether the writer now at work is a training call
};

// Holds the writer's part for a scope.
class WriteScope {
 public:
  WriteScope(WeightAccess& access, bool training, nanobind::handle name) : access_(access) {
    access_.begin_write(training, name);
  }
  ~WriteScope() { access_.end_write(); }
  WriteScope(const WriteScope&) = delete;
  WriteScope& operator=(const WriteScope&) = delete;

 private:
  WeightAccess& access_;
};

}  // namespace batchnorm::python
