#include "common/crash_handler.hpp"

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <initializer_list>

namespace openep::test {
namespace {

void write_all(const char* s) {
  size_t left = std::strlen(s);
  while (left > 0) {
    const ssize_t n = write(STDERR_FILENO, s, left);
    if (n <= 0) return;
    s += n;
    left -= static_cast<size_t>(n);
  }
}

// Async-signal-safe enough for a dying process: write(2), backtrace (its first call is made at install time, so
// it does not load libgcc here), then the default action.
void on_fatal_signal(int sig) {
  write_all("\n*** OpenEP test binary: fatal signal ");
  write_all(strsignal(sig));
  write_all("; stack of the crashing thread:\n");
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

void install_crash_handler() {
  // Line-buffered stdout (launch.py and CTest pipe it): a crash keeps every line printed before it.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  void* warm[1];
  (void)backtrace(warm, 1);
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) signal(sig, on_fatal_signal);
}

}  // namespace openep::test
