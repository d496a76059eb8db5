#include "openep/event.hpp"

#include <utility>

#include "openep/buffer.hpp"
#include "runtime/check.hpp"

namespace openep {

Event Event::record(cudaStream_t stream) {
  Event e;
  OPENEP_CUDA_CHECK(cudaEventCreateWithFlags(&e.event_, cudaEventDisableTiming));
  OPENEP_CUDA_CHECK(cudaEventRecord(e.event_, stream));
  return e;
}

Event::~Event() {
  if (event_) (void)cudaEventDestroy(event_);  // never throws; a failure here leaves nothing to clean up
}

Event::Event(Event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}

Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (event_) (void)cudaEventDestroy(event_);
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

void Event::wait(cudaStream_t stream) const {
  OPENEP_CHECK_ARG(event_ != nullptr, "Event::wait on an empty Event (default-constructed or moved from)");
  OPENEP_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}

bool Event::query() const {
  OPENEP_CHECK_ARG(event_ != nullptr, "Event::query on an empty Event (default-constructed or moved from)");
  const cudaError_t e = cudaEventQuery(event_);
  if (e == cudaErrorNotReady) return false;
  OPENEP_CUDA_CHECK(e);
  return true;
}

void Event::synchronize() const {
  OPENEP_CHECK_ARG(event_ != nullptr, "Event::synchronize on an empty Event (default-constructed or moved from)");
  OPENEP_CUDA_CHECK(cudaEventSynchronize(event_));
}

CommScope::CommScope(Buffer& buffer, const StreamOptions& options) : stream_(buffer.comm_stream()), options_(options) {
  OPENEP_CHECK_ARG(options.previous_event == nullptr || !options.previous_event->empty(),
                   "StreamOptions.previous_event points to an empty Event");
  if (options.previous_event) {
    options.previous_event->wait(stream_);
  } else if (options.compute_stream != stream_) {
    Event::record(options.compute_stream).wait(stream_);
  }
}

CommScope::~CommScope() {
  if (finished_) return;
  try {
    (void)finish();
  } catch (...) {  // a destructor must not throw; the CUDA error resurfaces at the next call
  }
}

Event CommScope::finish() {
  OPENEP_CHECK(!finished_, ErrorCode::kInvalidArgument, "CommScope::finish called twice");
  finished_ = true;
  Event done = Event::record(stream_);
  if (!options_.async_finish && options_.compute_stream != stream_) done.wait(options_.compute_stream);
  return done;
}

}  // namespace openep
