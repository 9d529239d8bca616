// Host buffers for the large outputs the layer allocates (y, dx), kept in a bounded cache of
// recently released ones. A fresh large allocation is mapped anew by the C library and every page
// of it faults on first write, which costs a memory-bound call more than its own work; a buffer
// given back by an array the caller dropped is already resident and is handed out again as is.
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings.hpp"
#include "tensors.hpp"

namespace batchnorm::python {

namespace nb = nanobind;

namespace {

// Large buffers are multiples of the x86-64 huge page and aligned to it, so that the kernel can
// back them with huge pages (one fault per 2 MiB on a miss). Below kHugeFrom that rounding would
// waste more than an eighth of the buffer: those are multiples of 64 KiB, aligned to 64 bytes
// (every vector store aligned) like all buffers.
constexpr std::size_t kHugePage = std::size_t{2} << 20;
constexpr std::size_t kHugeFrom = std::size_t{16} << 20;
constexpr std::size_t kSmallGranule = std::size_t{64} << 10;
constexpr std::size_t kAlignment = 64;

struct Block {
  void* data;
  std::size_t bytes;
};

// The cache: released blocks from least to most recently released, at most `limit` bytes in
// all. Blocks are only reused for a request of their exact (rounded) size, so a steady loop gets
// back the very buffers it freed and unrelated sizes never pin more memory than the limit.
class BufferCache {
 public:
  Block acquire(std::size_t bytes) {
    const bool huge = bytes >= kHugeFrom;
    const std::size_t granule = huge ? kHugePage : kSmallGranule;
    const std::size_t rounded = (bytes + granule - 1) / granule * granule;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {
        if (it->bytes == rounded) {
          const Block block = *it;
          cached_.erase(std::next(it).base());
          cached_bytes_ -= rounded;
          ++hits_;
          return block;
        }
      }
      ++misses_;
    }
    void* data = std::aligned_alloc(huge ? kHugePage : kAlignment, rounded);
    if (data == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    // Advice only: where transparent huge pages are off or unavailable, plain pages are used.
    if (huge) madvise(data, rounded, MADV_HUGEPAGE);
#endif
    return {data, rounded};
  }

  // Takes a block back; frees it, or the oldest cached ones, where the limit is exceeded.
  void release(Block block) {
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block.bytes > limit_) {
        evicted.push_back(block);
      } else {
        cached_.push_back(block);
        cached_bytes_ += block.bytes;
        evict(evicted);
      }
    }
    free_all(evicted);  // outside the lock: unmapping large blocks takes a while
  }

  std::size_t set_limit(std::size_t limit) {
    std::list<Block> evicted;
    std::size_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = limit_;
      limit_ = limit;
      evict(evicted);
    }
    free_all(evicted);
    return previous;
  }

  std::size_t empty() {
    std::list<Block> evicted;
    std::size_t freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(cached_);
      freed = cached_bytes_;
      cached_bytes_ = 0;
    }
    free_all(evicted);
    return freed;
  }

  nb::dict info() {
    std::lock_guard<std::mutex> lock(mutex_);
    nb::dict result;
    result["limit"] = limit_;
    result["cached_bytes"] = cached_bytes_;
    result["cached_buffers"] = cached_.size();
    result["hits"] = hits_;
    result["misses"] = misses_;
    return result;
  }

 private:
  void evict(std::list<Block>& evicted) {
    while (cached_bytes_ > limit_) {
      cached_bytes_ -= cached_.front().bytes;
      evicted.splice(evicted.end(), cached_, cached_.begin());
    }
  }

  static void free_all(const std::list<Block>& blocks) {
    for (const Block& block : blocks) std::free(block.data);
  }

  std::mutex mutex_;
  std::list<Block> cached_;
  std::size_t cached_bytes_ = 0;
  std::size_t limit_ = std::size_t{512} << 20;
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
};

// Never destroyed: arrays holding blocks may outlive the module at interpreter exit, and their
// owners give the blocks back here whenever that happens.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

// An array of `shape` and `strides` (in elements, dense in some axis order) on a cached block,
// owned by a capsule that gives the block back when the array (and every view of it) is freed.
template <class Framework>
nb::ndarray<Framework> cached_empty(const std::vector<std::size_t>& shape,
                                    const std::vector<std::int64_t>& strides,
                                    const std::string& dtype) {
  if (strides.size() != shape.size()) throw nb::value_error("strides must match the shape");
  // NumPy has no bfloat16: its arrays are made as uint16 and viewed as ml_dtypes' bfloat16.
  const bool numpy_bfloat16 = std::is_same_v<Framework, nb::numpy> && dtype == "bfloat16";
  const nb::dlpack::dtype dt = numpy_bfloat16 ? nb::dtype<std::uint16_t>() : dlpack_dtype(dtype);
  std::size_t count = 1;
  for (std::size_t n : shape) count *= n;
  Block* block = new Block(cache().acquire(count * dt.bits / 8));
  nb::capsule owner(block, [](void* p) noexcept {
    Block* released = static_cast<Block*>(p);
    cache().release(*released);
    delete released;
  });
  return nb::ndarray<Framework>(block->data, shape.size(), shape.data(), owner, strides.data(), dt,
                                nb::device::cpu::value, 0);
}

}  // namespace

void bind_buffers(nb::module_& m) {
  m.def("cached_numpy", &cached_empty<nb::numpy>, nb::arg("shape"), nb::arg("strides"),
        nb::arg("dtype"), "An uninitialized NumPy array on a buffer from the cache.");
  m.def("cached_torch", &cached_empty<nb::pytorch>, nb::arg("shape"), nb::arg("strides"),
        nb::arg("dtype"), "An uninitialized CPU torch tensor on a buffer from the cache.");
  m.def(
      "set_buffer_cache_limit", [](std::size_t limit) { return cache().set_limit(limit); },
      nb::arg("limit"), "Sets the cache's limit in bytes; returns the previous one.");
  m.def(
      "empty_buffer_cache", [] { return cache().empty(); },
      "Frees every cached buffer; returns the bytes freed.");
  m.def(
      "buffer_cache_info", [] { return cache().info(); },
      "The limit, cached bytes and buffers, hits and misses.");
}

}  // namespace batchnorm::python
