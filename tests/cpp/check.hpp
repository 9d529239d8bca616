// The C++ tests' harness: self-registering cases, checks that report and carry on, vector
// closeness with absolute + relative tolerance, and expected exceptions with message fragments.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace bntest {

struct Case {
  const char* name;
  void (*run)();
};

inline std::vector<Case>& cases() {
  static std::vector<Case> registered;
  return registered;
}

inline int& failures() {
  static int count = 0;
  return count;
}

inline bool add_case(const char* name, void (*run)()) {
  cases().push_back({name, run});
  return true;
}

inline void report(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  ++failures();
}

// Elementwise |actual - expected| <= atol + rtol * |expected| (NaN matches NaN); reports the
// first few mismatches with their index.
template <class A, class B>
bool close_all(const std::vector<A>& actual, const std::vector<B>& expected, double atol,
               double rtol, const char* file, int line, const std::string& what) {
  if (actual.size() != expected.size()) {
    report(file, line,
           what + ": size " + std::to_string(actual.size()) + " vs " +
               std::to_string(expected.size()));
    return false;
  }
  int shown = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = static_cast<double>(actual[i]), e = static_cast<double>(expected[i]);
    if (std::isnan(a) && std::isnan(e)) continue;
    if (std::fabs(a - e) <= atol + rtol * std::fabs(e)) continue;
    if (shown++ < 5) {
      char buffer[160];
      std::snprintf(buffer, sizeof buffer, "[%zu]: %.17g vs expected %.17g (diff %.3g)", i, a, e,
                    a - e);
      report(file, line, what + buffer);
    }
  }
  if (shown > 5) report(file, line, what + ": " + std::to_string(shown) + " mismatches in all");
  return shown == 0;
}

template <class E, class F>
void expect_throw(F&& statement, const char* fragment, const char* file, int line,
                  const char* text) {
  try {
    statement();
  } catch (const E& error) {
    if (std::string(error.what()).find(fragment) == std::string::npos) {
      report(file, line,
             std::string(text) + ": message \"" + error.what() + "\" lacks \"" + fragment + "\"");
    }
    return;
  } catch (const std::exception& error) {
    report(file, line, std::string(text) + ": threw another exception type: " + error.what());
    return;
  }
  report(file, line, std::string(text) + ": did not throw");
}

// Runs every registered case, printing one line each; the exit status is 0 when all passed.
inline int run_all() {
  for (const Case& c : cases()) {
    const int before = failures();
    try {
      c.run();
    } catch (const std::exception& error) {
      report(__FILE__, __LINE__, std::string(c.name) + " threw: " + error.what());
    }
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", c.name);
  }
  std::printf("%zu cases, %d failed checks\n", cases().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace bntest

#define BNTEST_CASE(name)                                                                 \
  static void name();                                                                     \
  [[maybe_unused]] static const bool name##_registered = ::bntest::add_case(#name, name); \
  static void name()

#define BNTEST_CHECK(condition)                                         \
  do {                                                                  \
    if (!(condition)) ::bntest::report(__FILE__, __LINE__, #condition); \
  } while (0)

#define BNTEST_CLOSE(actual, expected, atol, rtol, what) \
  ::bntest::close_all(actual, expected, atol, rtol, __FILE__, __LINE__, what)

// BNTEST_THROWS(std::invalid_argument, "message fragment", statement...)
#define BNTEST_THROWS(Exception, fragment, ...)                                         \
  ::bntest::expect_throw<Exception>([&] { __VA_ARGS__; }, fragment, __FILE__, __LINE__, \
                                    #__VA_ARGS__)
