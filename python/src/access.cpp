// WeightAccess: the layer's guard between writers and readers of its weights.
#include "access.hpp"

#include <stdexcept>
#include <string>

namespace nb = nanobind;

namespace batchnorm::python {

std::uint64_t WeightAccess::stable_version() {
  std::uint64_t version = version_.load();
  while (version & 1) {
    std::unique_lock<std::mutex> wait(mutex_, std::defer_lock);
    {
      nb::gil_scoped_release released;  // the writer may need the GIL to finish
      wait.lock();
    }
    // The mutex is held until the GIL is back and the version read: given back first, it went
    // to a writer that keeps the GIL between its calls (a training loop), whose next write had
    // begun by the time this thread ran again, so that inference next to training all but
    // stopped (tens of calls in 2 s). Every thread that blocks on the mutex has let go of the
    // GIL, so holding it while taking the GIL cannot deadlock.
    version = version_.load();
  }
  return version;
}

void WeightAccess::begin_write(bool training, nb::handle name) {
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
      "odd while they work; readers read again where the version changed meanwhile.")
      .def(nb::init<>())
      .def_prop_ro("version", &WeightAccess::version,
                   "Odd while a writer is at work; changes with every write.")
      .def("stable_version", &WeightAccess::stable_version,
           "The version when no writer is at work (waiting for one that is).")
      .def("begin_write", &WeightAccess::begin_write, nb::arg("training"), nb::arg("name"),
           "Takes the writer's part; RuntimeError where `training` and another thread's training "
           "call has it (`name` names the layer in the message).")
      .def("end_write", &WeightAccess::end_write, "Gives the writer's part back.");
}

}  // namespace batchnorm::python
