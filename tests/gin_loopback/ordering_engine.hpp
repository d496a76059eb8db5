// Receive-side ordering engine of the loopback GIN plugin (pure host code, unit-tested on CPU).
//
// One engine per (GIN context, source peer): ops arrive in the order the peer issued them on that context
// (the plugin's byte stream is FIFO). Each op has a DATA part (the put's payload) and, for a put with signal,
// a SIGNAL part. The only rule NCCL 2.28.9 promises (src/include/nccl_device/gin.h, put(): "that signal will be
// visible only after the payload of this put as well as the payloads of preceding puts on this context to the
// same peer are settled") is enforced, and nothing stronger:
//   - adversarial (default): every data part is released at a random time in [arrival, arrival + maxDelay],
//     released parts are applied in shuffled order; a signal part is released at its own random time and, when
//     it is applied, first forces every not-yet-applied data part of ops up to and including its own (shuffled).
//     So puts land late and out of order, later puts may land before an earlier signal, and signals of one peer
//     may land out of order with each other (only their payload-before-signal rule holds).
//   - ordered: everything is applied at once in arrival order (data, then signal, op by op).
#pragma once
#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <random>
#include <vector>

namespace openep_gin_lb {

struct EngineConfig {
  bool adversarial = true;
  uint64_t max_delay_ns = 2'000'000;  // 2 ms
  uint64_t seed = 1;
};

enum class Part { kData, kSignal };

template <class Op>
class OrderingEngine {
 public:
  struct Action {
    std::shared_ptr<Op> op;
    Part part;
  };

  explicit OrderingEngine(EngineConfig cfg) : cfg_(cfg), rng_(cfg.seed) {}

  void push(Op op, bool has_signal, uint64_t now_ns) {
    Entry e;
    e.op = std::make_shared<Op>(std::move(op));
    e.has_signal = has_signal;
    e.data_release = now_ns + delay();
    e.signal_release = now_ns + delay();
    entries_.push_back(std::move(e));
  }

  // The parts to apply now, in the order they must be applied.
  std::vector<Action> poll(uint64_t now_ns) {
    std::vector<Action> out;
    if (!cfg_.adversarial) {
      for (auto& e : entries_) {
        out.push_back({e.op, Part::kData});
        if (e.has_signal) out.push_back({e.op, Part::kSignal});
      }
      entries_.clear();
      return out;
    }
    // Data parts whose time has come, shuffled.
    std::vector<size_t> idx;
    for (size_t i = 0; i < entries_.size(); ++i)
      if (!entries_[i].data_done && entries_[i].data_release <= now_ns) idx.push_back(i);
    std::shuffle(idx.begin(), idx.end(), rng_);
    for (size_t i : idx) take_data(i, out);
    // Signal parts whose time has come, in random order; each forces the data of ops up to itself.
    std::vector<size_t> sig;
    for (size_t i = 0; i < entries_.size(); ++i)
      if (entries_[i].has_signal && !entries_[i].signal_done && entries_[i].signal_release <= now_ns) sig.push_back(i);
    std::shuffle(sig.begin(), sig.end(), rng_);
    for (size_t s : sig) {
      std::vector<size_t> before;
      for (size_t i = 0; i <= s; ++i)
        if (!entries_[i].data_done) before.push_back(i);
      std::shuffle(before.begin(), before.end(), rng_);
      for (size_t i : before) take_data(i, out);
      entries_[s].signal_done = true;
      out.push_back({entries_[s].op, Part::kSignal});
    }
    // Drop fully applied entries (their relative order is kept for the rest).
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) { return e.data_done && (!e.has_signal || e.signal_done); }),
                   entries_.end());
    return out;
  }

  // Everything still held, in a legal order (used when a connection closes).
  std::vector<Action> drain() { return poll(UINT64_MAX); }

  size_t pending() const { return entries_.size(); }
  const EngineConfig& config() const { return cfg_; }

 private:
  struct Entry {
    std::shared_ptr<Op> op;
    bool has_signal = false;
    bool data_done = false;
    bool signal_done = false;
    uint64_t data_release = 0;
    uint64_t signal_release = 0;
  };

  uint64_t delay() {
    if (!cfg_.adversarial || cfg_.max_delay_ns == 0) return 0;
    return std::uniform_int_distribution<uint64_t>(0, cfg_.max_delay_ns)(rng_);
  }
  void take_data(size_t i, std::vector<Action>& out) {
    entries_[i].data_done = true;
    out.push_back({entries_[i].op, Part::kData});
  }

  EngineConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<Entry> entries_;
};

}  // namespace openep_gin_lb
