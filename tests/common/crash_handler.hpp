// A fatal signal in a test binary (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) prints the crashing thread's stack to
// stderr before the process dies with that signal (CTest then still reports SEGFAULT etc.), so a crash on a lent
// GPU machine leaves a trace in the log. Names resolve for exported symbols (the test executables link with
// ENABLE_EXPORTS); the rest print as addresses. It also makes stdout line-buffered, so the lines before a crash
// reach the log.
#pragma once

namespace openep::test {
void install_crash_handler();
}  // namespace openep::test
