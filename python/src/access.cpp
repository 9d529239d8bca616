// WeightAccess: the layer's guard between writers and readers of its weights.
#include "access.hpp"

#include <stdexcept>
#include <string>

namespace nb = nanobind;

namespace batchnorm::python {

void WeightAccess::begin_read() {
  if (mutex_.try_lock_shared()) return;
  waiting_readers_.fetch_add(1);
  nb::gil_scoped_release released;  // the writer may need the GIL to finish
  mutex_.lock_shared();
  {
    const std::lock_guard<std::mutex> turn(turn_mutex_);
    waiting_readers_.fetch_sub(1);
  }
  readers_served_.notify_all();
  // Every thread that blocks on the mutex has let go of the GIL, so holding the mutex while the
  // GIL is taken back (leaving this scope) cannot deadlock.
}

void WeightAccess::begin_write(bool training, nb::handle name) {
  if (waiting_readers_.load() != 0) {
    nb::gil_scoped_release released;  // (the readers need it to finish)
    std::unique_lock<std::mutex> turn(turn_mutex_);
    readers_served_.wait(turn, [this] { return waiting_readers_.load() == 0; });
  }
  if (!mutex_.try_lock()) {
    if (training && training_.load()) {
      throw std::runtime_error(
          nb::str(name).c_str() +
          std::string(": another thread is training this layer; one layer trains in one thread "
                      "at a time (use a layer per thread, or batchnorm.functional.forward/backward "
                      "with weights per thread)"));
    }
    nb::gil_scoped_release released;  // (the holder may need the GIL to finish)
    mutex_.lock();
  }
  training_.store(training);
  version_.fetch_add(1);
}

void WeightAccess::end_write() {
  version_.fetch_add(1);
  training_.store(false);
  mutex_.unlock();
}

void bind_access(nb::module_& m) {
  nb::class_<WeightAccess>(
      m, "WeightAccess",
      "Who changes a layer's weights now, across threads: writers hold a lock and keep `version` "
      "odd while they work; a reader whose version changed meanwhile reads again under the lock, "
      "shared with other readers.")
      .def(nb::init<>())
      .def_prop_ro("version", &WeightAccess::version,
                   "Odd while a writer is at work; changes with every write.")
      .def("begin_read", &WeightAccess::begin_read,
           "Takes the lock, shared, for a reader that met a writer (the version stays as it is).")
      .def("end_read", &WeightAccess::end_read, "Gives the reader's lock back.")
      .def("begin_write", &WeightAccess::begin_write, nb::arg("training"), nb::arg("name"),
           "Takes the writer's part; RuntimeError where `training` and another thread's training "
           "call has it (`name` names the layer in the message).")
      .def("end_write", &WeightAccess::end_write, "Gives the writer's part back.");
}

}  // namespace batchnorm::python
