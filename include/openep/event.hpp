// Streams and events: the C++ counterpart of DeepEP's EventOverlap / previous_event / async_finish.
//
// Every Buffer operation is enqueued on the stream it is given. To overlap communication with compute the way
// DeepEP does, run the operations on the Buffer's communication stream inside a CommScope:
//
//   openep::CommScope scope(buffer, {compute_stream, /*previous_event=*/nullptr, /*async_finish=*/true});
//   buffer.dispatch_prepare(args, handle, scope.stream());
//   buffer.dispatch(args, handle, outputs, scope.stream());
//   openep::Event done = scope.finish();   // recorded on the communication stream
//   ... independent compute on compute_stream ...
//   done.wait(compute_stream);             // DeepEP's EventOverlap.current_stream_wait()
//
// Ordering (DeepEP V1, deepep-v1-interface.md 5.11):
//   - on entry the communication stream waits for `previous_event` if given, else for `compute_stream`, so
//     the operation sees everything enqueued before it on the caller's stream;
//   - finish() records an Event on the communication stream; unless `async_finish`, it also makes
//     compute_stream wait for it, so later work on compute_stream sees the results.
// Memory: with async_finish the caller must keep every input and output of the operations alive and unmodified
// until the returned Event has completed (in C++ nothing records that for you; the Python layer calls
// record_stream). Nothing here synchronises the host.
#pragma once

#include <cuda_runtime.h>

namespace openep {

class Buffer;

// An owning cudaEvent_t (created with cudaEventDisableTiming). Movable, not copyable. An empty Event (default
// constructed or moved from) holds no CUDA event; waiting on or querying it raises kInvalidArgument.
class Event {
 public:
  Event() noexcept = default;
  // Creates an event and records it on `stream` (the current device must be the stream's device).
  static Event record(cudaStream_t stream);
  ~Event();
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  bool empty() const noexcept { return event_ == nullptr; }
  cudaEvent_t get() const noexcept { return event_; }
  // Makes `stream` wait (on the device) for the work the event captured. Does not block the host.
  void wait(cudaStream_t stream) const;
  // True when the captured work has completed (cudaEventQuery); never blocks.
  bool query() const;
  // Blocks the host until the captured work has completed.
  void synchronize() const;

 private:
  cudaEvent_t event_ = nullptr;
};

struct StreamOptions {
  cudaStream_t compute_stream = nullptr;  // the caller's stream (nullptr = the legacy default stream)
  const Event* previous_event = nullptr;  // if set, wait for this instead of compute_stream
  bool async_finish = false;              // if false, finish() makes compute_stream wait for the operations
};

// Runs operations on a Buffer's communication stream with DeepEP's ordering (see the top of this file).
// REQUIRES: the Buffer outlives the scope. finish() is called at most once; if it is never called, the
// destructor does what finish() would (without returning the Event) so compute_stream is never left unordered.
class CommScope {
 public:
  CommScope(Buffer& buffer, const StreamOptions& options);
  ~CommScope();
  CommScope(const CommScope&) = delete;
  CommScope& operator=(const CommScope&) = delete;

  // The stream to pass to the Buffer's operations (the Buffer's communication stream).
  cudaStream_t stream() const noexcept { return stream_; }
  // Records the completion Event on the communication stream; unless async_finish, compute_stream waits for it.
  Event finish();

 private:
  cudaStream_t stream_;
  StreamOptions options_;
  bool finished_ = false;
};

}  // namespace openep
