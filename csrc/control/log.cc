#include "control/log.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

namespace flexkv {
namespace {

std::mutex g_sink_mu;
std::shared_ptr<const LogSink> g_sink;  // null: the default

LogLevel threshold() {
  static const LogLevel level = [] {
    const char* v = std::getenv("FLEXKV_LOG_LEVEL");
    if (v == nullptr) return LogLevel::kWarning;
    if (std::strcmp(v, "debug") == 0 || std::strcmp(v, "DEBUG") == 0) return LogLevel::kDebug;
    if (std::strcmp(v, "info") == 0 || std::strcmp(v, "INFO") == 0) return LogLevel::kInfo;
    if (std::strcmp(v, "error") == 0 || std::strcmp(v, "ERROR") == 0) return LogLevel::kError;
    return LogLevel::kWarning;
  }();
  return level;
}

const char* name_of(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarning: return "WARNING";
    case LogLevel::kError: return "ERROR";
  }
  return "?";
}

}  // namespace

void set_log_sink(LogSink sink) {
  std::lock_guard<std::mutex> g(g_sink_mu);
  g_sink = sink ? std::make_shared<const LogSink>(std::move(sink)) : nullptr;
}

void log_line(LogLevel level, const std::string& message) {
  std::shared_ptr<const LogSink> sink;
  {
    std::lock_guard<std::mutex> g(g_sink_mu);
    sink = g_sink;
  }
  if (sink) {
    (*sink)(level, message);
    return;
  }
  if (level >= threshold()) std::fprintf(stderr, "flexkv %s: %s\n", name_of(level), message.c_str());
}

}  // namespace flexkv
