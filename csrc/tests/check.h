// A minimal test harness: CHECK records a failure and the test binary exits
// non-zero at the end; every test binary is one ctest case.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace flexkv_test {

inline int& failures() {
  static int n = 0;
  return n;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> r;
  return r;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline int run_all() {
  for (auto& [name, fn] : registry()) {
    const int before = failures();
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  unexpected exception: %s\n", e.what());
      ++failures();
    }
    std::printf("%s %s\n", failures() == before ? "PASS" : "FAIL", name.c_str());
  }
  std::printf("%d failure(s)\n", failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace flexkv_test

#define TEST(name)                                                         \
  static void name();                                                      \
  static flexkv_test::Register name##_registered(#name, name);             \
  static void name()

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++flexkv_test::failures();                                                     \
    }                                                                                \
  } while (0)

#define CHECK_EQ(a, b) CHECK((a) == (b))

#define CHECK_THROWS(expr)          \
  do {                              \
    bool threw_ = false;            \
    try {                           \
      expr;                         \
    } catch (const std::exception&) { \
      threw_ = true;                \
    }                               \
    CHECK(threw_ && #expr);         \
  } while (0)

#define TEST_MAIN() \
  int main() { return flexkv_test::run_all(); }
