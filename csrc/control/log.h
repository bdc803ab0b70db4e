// Log lines of the control plane. By default they go to stderr at or above
// FLEXKV_LOG_LEVEL (debug, info, warning, error; default warning); a host
// (the Python module) may route them elsewhere with set_log_sink.
//
// Contract for callers: never log while holding a lock that a sink could need
// (the Python sink takes the GIL): collect the lines, unlock, then log.
#pragma once

#include <functional>
#include <string>

namespace flexkv {

enum class LogLevel { kDebug = 10, kInfo = 20, kWarning = 30, kError = 40 };

using LogSink = std::function<void(LogLevel, const std::string&)>;

// Replaces the process-wide sink; an empty function restores the default.
void set_log_sink(LogSink sink);
void log_line(LogLevel level, const std::string& message);

}  // namespace flexkv
