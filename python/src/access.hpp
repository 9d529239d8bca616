// Who changes a layer's weights now, across threads: the kernels run without the GIL, so Python
// threads calling one layer overlap.
//
// Writers (a training call, which updates the moving statistics in place, or a change of the
// weights) hold a mutex and keep `version` odd while they work. Readers (inference calls, weight
// snapshots) first take no lock: they note an even version, read, and keep what they read where
// the version is unchanged, so that no snapshot mixes two steps and no inference result comes
// from a half-updated statistic. A reader that met a writer (an odd version, or a changed one)
// reads again holding the lock, shared with other such readers: retried without it, a read that
// takes longer than the gap between a training loop's calls would fail every time, and
// inference beside such a loop all but stopped (about a hundred calls in 0.7 s at (128, 1024));
// held exclusively, three inference threads queued behind each other and the training thread
// behind all three (526 training calls in 1 s against 22,000 inference calls each). Two
// training calls of one layer at once are refused: the layer keeps one call's context for
// backward, so their steps could not be told apart.
//
// It lives in C++ so that the layer's plain call (operations.cpp) takes and gives back its part
// within its one call into the extension.
#pragma once

#include <nanobind/nanobind.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <shared_mutex>

namespace batchnorm::python {

class WeightAccess {
 public:
  std::uint64_t version() const { return version_.load(); }

  // Takes the lock, shared, for a reader that met a writer, waiting without the GIL; the version
  // stays as it is, so readers without the lock go on.
  void begin_read();
  // Gives it back; the GIL need not be held.
  void end_read() { mutex_.unlock_shared(); }

  // Takes the writer's part, waiting without the GIL for another writer. RuntimeError (naming
  // the layer, `name`) where this is a training call and another thread's training call has it.
  void begin_write(bool training, nanobind::handle name);
  // Gives it back; the GIL need not be held.
  void end_write();

 private:
  std::shared_mutex mutex_;  // exclusive for writers, shared for readers that met one
  std::atomic<std::uint64_t> version_{0};
  // Readers waiting for the lock, and where a writer waits for them to have taken it: the lock
  // does not hand itself over, and a training loop, whose next call comes before a woken reader
  // runs, took it again nearly every time (inference next to it slowed eightfold).
  std::atomic<int> waiting_readers_{0};
  std::mutex turn_mutex_;
  std::condition_variable readers_served_;
  std::atomic<bool> training_{false};  // whether the writer now at work is a training call
};

// Holds the reader's lock for a scope, or until release() (which need not hold the GIL).
class ReadScope {
 public:
  explicit ReadScope(WeightAccess& access) : access_(&access) { access.begin_read(); }
  ~ReadScope() { release(); }
  void release() {
    if (access_) access_->end_read();
    access_ = nullptr;
  }
  ReadScope(const ReadScope&) = delete;
  ReadScope& operator=(const ReadScope&) = delete;

 private:
  WeightAccess* access_;
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
