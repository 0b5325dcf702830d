#include "fabric/core/adversary.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "common/error.h"

namespace jax_garden::fabric {
namespace {

// Salts: one independent stream of decisions per kind of choice.
enum Salt : uint64_t {
  kSaltHold = 1, kSaltDelay, kSaltLast, kSaltLastDelay, kSaltReset, kSaltResetCut, kSaltImm, kSaltImmDelay,
  kSaltCopy, kSaltCopyDelay, kSaltSplit, kSaltTail, kSaltCopyTail, kSaltCopyTailDelay,
};

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Process-wide totals (tests check that the mode acted in engines they never see).
std::mutex g_totals_mu;
AdversaryStats g_totals;

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

double parse_number(const std::string& key, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  JG_CHECK_ARG(!text.empty() && end && *end == '\0' && std::isfinite(v), "adversary: ", key, "='", text,
               "' is not a number");
  return v;
}

}  // namespace

void AdversaryStats::add(const AdversaryStats& o) {
  pieces += o.pieces;
  held += o.held;
  messages_held += o.messages_held;
  reordered += o.reordered;
  last_held += o.last_held;
  tail_held += o.tail_held;
  imms_held += o.imms_held;
  imm_splits += o.imm_splits;
  copies_delayed += o.copies_delayed;
  early_completions += o.early_completions;
  resets += o.resets;
  targeted += o.targeted;
}

bool AdversaryOptions::parse(const std::string& raw, AdversaryOptions* out) {
  std::string spec = trim(raw);
  std::string lower = spec;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower.empty() || lower == "0" || lower == "off" || lower == "no" || lower == "false") return false;
  AdversaryOptions o;
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    item = trim(item);
    if (item.empty()) continue;
    size_t eq = item.find('=');
    std::string key = eq == std::string::npos ? "seed" : trim(item.substr(0, eq));
    std::string text = eq == std::string::npos ? item : trim(item.substr(eq + 1));
    double v = parse_number(key, text);
    auto probability = [&](double* field) {
      JG_CHECK_ARG(v >= 0 && v <= 1, "adversary: ", key, " is a probability in [0, 1], got ", text);
      *field = v;
    };
    if (key == "seed") {
      JG_CHECK_ARG(v >= 0 && v == std::floor(v) && v < 1.8e19, "adversary: seed must be a non-negative integer, got ",
                   text);
      o.seed = static_cast<uint64_t>(v);
    } else if (key == "hold") {
      probability(&o.hold);
    } else if (key == "msg") {
      probability(&o.msg);
    } else if (key == "imm") {
      probability(&o.imm);
    } else if (key == "last") {
      probability(&o.last);
    } else if (key == "tail") {
      probability(&o.tail);
    } else if (key == "reset") {
      probability(&o.reset);
    } else if (key == "delay_ms" || key == "last_ms") {
      JG_CHECK_ARG(v >= 0 && v <= 10000, "adversary: ", key, " must be in [0, 10000] ms, got ", text);
      (key == "delay_ms" ? o.delay_ms : o.last_ms) = v;
    } else if (key == "early") {
      JG_CHECK_ARG(v == 0 || v == 1, "adversary: early is 0 or 1, got ", text);
      o.early = v == 1;
    } else if (key == "split") {
      JG_CHECK_ARG(v >= 1 && v <= 64 && v == std::floor(v), "adversary: split must be an integer in 1..64, got ", text);
      o.split = static_cast<uint32_t>(v);
    } else {
      throw InvalidArgument(str_cat("adversary: unknown setting '", key,
                                    "' (known: seed, hold, msg, imm, last, tail, delay_ms, last_ms, reset, early, split)"));
    }
  }
  JG_CHECK_ARG(o.last_ms >= o.delay_ms, "adversary: last_ms (", o.last_ms, ") must be >= delay_ms (", o.delay_ms,
               "): the last piece is held by the wider margin");
  *out = o;
  return true;
}

std::string AdversaryOptions::to_string() const {
  return str_cat("seed=", seed, ",hold=", hold, ",msg=", msg, ",imm=", imm, ",last=", last, ",tail=", tail,
                 ",delay_ms=", delay_ms,
                 ",last_ms=", last_ms, ",reset=", reset, ",early=", early ? 1 : 0, ",split=", split);
}

AdversaryStats Adversary::stats() const {
  AdversaryStats s;
  {
    MutexLock lk(stats_mu_);
    s = stats_;
  }
  s.held_now = timed_.size() + imms_.size() + held_by_rules_ + copies_held_.load(std::memory_order_acquire);
  return s;
}

AdversaryStats Adversary::totals() {
  std::lock_guard<std::mutex> lk(g_totals_mu);
  return g_totals;
}

void Adversary::count(uint64_t AdversaryStats::*field, uint64_t n) {
  {
    MutexLock lk(stats_mu_);
    stats_.*field += n;
  }
  std::lock_guard<std::mutex> lk(g_totals_mu);
  g_totals.*field += n;
}

double Adversary::unit(uint64_t a, uint64_t b, uint64_t salt) const {
  uint64_t h = splitmix64(o_.seed ^ splitmix64(a ^ splitmix64(b ^ splitmix64(salt))));
  return double(h >> 11) * 0x1.0p-53;
}

Clock::duration Adversary::ms(double v) const {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(v));
}

Adversary::OpDecision Adversary::on_install(Op& op, bool delivery_complete) {
  OpDecision d;
  d.op_seq = next_op_++;
  const size_t n = op.wrs.size();
  bool is_send = n && op.wrs[0].hdr.kind == ContextKind::kSend;
  if (!is_send && n >= 2 && o_.reset > 0 && unit(d.op_seq, 0, kSaltReset) < o_.reset) {
    // The connection drops after the first `cut` pieces were handed over: the rest fail.
    size_t cut = 1 + std::min(n - 2, static_cast<size_t>(unit(d.op_seq, 0, kSaltResetCut) * double(n - 1)));
    for (size_t i = cut; i < n; ++i) op.wrs[i].reset = true;
    count(&AdversaryStats::resets);
    return d;  // a reset op is never completed early: its failure must be seen
  }
  if (delivery_complete || !o_.early || !op.user) return d;
  // Early (transmit) completion is legal whatever happens next; it matters when a piece is held.
  for (size_t i = 0; i < n && !d.early; ++i) {
    const WorkRequest& wr = op.wrs[i];
    if (wr.has_imm)
      for (const Rule& r : rules_)
        if (!r.released && (wr.imm & r.mask) == (r.imm & r.mask)) d.early = true;
    double p = wr.hdr.kind == ContextKind::kSend ? o_.msg : o_.hold;
    if (unit(d.op_seq, i, kSaltHold) < p || (n >= 2 && i == n - 1 && unit(d.op_seq, i, kSaltLast) < o_.last) ||
        (wr.hdr.kind != ContextKind::kSend && unit(d.op_seq, i, kSaltTail) < o_.tail))
      d.early = true;
  }
  return d;
}

bool Adversary::hold(WorkRequest& wr, uint64_t op_seq, size_t index, size_t pieces, Clock::time_point now) {
  uint64_t seq = next_seq_++;
  count(&AdversaryStats::pieces);
  const bool msg = wr.hdr.kind == ContextKind::kSend;
  if (!msg && wr.has_imm) {
    for (Rule& r : rules_) {
      if (r.released || (wr.imm & r.mask) != (r.imm & r.mask)) continue;
      if (r.skip > 0) {
        r.skip--;
        break;
      }
      r.held.emplace_back(seq, &wr);
      held_by_rules_++;
      count(&AdversaryStats::targeted);
      count(&AdversaryStats::held);
      return true;
    }
  }
  Clock::duration delay;
  const bool last = !msg && pieces >= 2 && index == pieces - 1 && unit(op_seq, index, kSaltLast) < o_.last;
  if (last || (!msg && unit(op_seq, index, kSaltTail) < o_.tail)) {  // the wide margin
    double lo = (o_.delay_ms + o_.last_ms) / 2;
    delay = ms(lo + (o_.last_ms - lo) * unit(op_seq, index, kSaltLastDelay));
    count(last ? &AdversaryStats::last_held : &AdversaryStats::tail_held);
  } else if (unit(op_seq, index, kSaltHold) < (msg ? o_.msg : o_.hold)) {
    delay = ms(o_.delay_ms * unit(op_seq, index, kSaltDelay));
  } else {
    max_passed_ = std::max(max_passed_, seq + 1);
    return false;
  }
  timed_.push({now + delay, seq, &wr});
  count(&AdversaryStats::held);
  if (msg) count(&AdversaryStats::messages_held);
  return true;
}

void Adversary::note_released(uint64_t seq) {
  if (max_passed_ > seq + 1) count(&AdversaryStats::reordered);
  max_passed_ = std::max(max_passed_, seq + 1);
}

void Adversary::release_due(Clock::time_point now, std::vector<WorkRequest*>* pieces,
                            std::vector<std::pair<uint32_t, int64_t>>* imms) {
  while (!timed_.empty() && timed_.top().at <= now) {
    note_released(timed_.top().seq);
    pieces->push_back(timed_.top().wr);
    timed_.pop();
  }
  for (Rule& r : rules_) {
    // A rule's pieces go when it is released; those of an op that failed (timeout, close) go at once
    // (the worker drops them unposted).
    auto keep = std::stable_partition(r.held.begin(), r.held.end(),
                                      [&](const auto& h) { return !r.released && !h.second->op->failed; });
    for (auto it = keep; it != r.held.end(); ++it) {
      note_released(it->first);
      pieces->push_back(it->second);
    }
    held_by_rules_ -= static_cast<size_t>(r.held.end() - keep);
    r.held.erase(keep, r.held.end());
  }
  rules_.erase(std::remove_if(rules_.begin(), rules_.end(), [](const Rule& r) { return r.released; }), rules_.end());
  while (!imms_.empty() && imms_.top().at <= now) {
    imms->emplace_back(imms_.top().imm, imms_.top().n);
    imms_.pop();
  }
}

bool Adversary::hold_imm(uint32_t imm, int64_t n, Clock::time_point now) {
  uint64_t seq = imm_seq_++;
  if (unit(seq, imm, kSaltImm) >= o_.imm) return false;
  imms_.push({now + ms(o_.delay_ms * unit(seq, imm, kSaltImmDelay)), seq, imm, n});
  count(&AdversaryStats::imms_held, static_cast<uint64_t>(n));
  return true;
}

void Adversary::clear() {
  timed_ = {};
  imms_ = {};
  rules_.clear();
  held_by_rules_ = 0;
}

Adversary::CopyStart Adversary::copy_start(Clock::time_point now) {
  CopyStart c;
  {
    MutexLock lk(ipc_mu_);
    c.seq = copy_seq_++;
  }
  const uint64_t k = c.seq;
  count(&AdversaryStats::pieces);
  if (unit(k, 0, kSaltCopyTail) < o_.tail) {  // the wide margin: this destination lands far behind
    double lo = (o_.delay_ms + o_.last_ms) / 2;
    c.at = now + ms(lo + (o_.last_ms - lo) * unit(k, 0, kSaltCopyTailDelay));
    count(&AdversaryStats::tail_held);
  } else if (unit(k, 0, kSaltCopy) < o_.hold) {
    c.at = now + ms(o_.delay_ms * unit(k, 0, kSaltCopyDelay));
  } else {
    MutexLock lk(ipc_mu_);
    copy_max_started_ = std::max(copy_max_started_, c.seq + 1);
    return c;
  }
  copies_held_.fetch_add(1, std::memory_order_acq_rel);
  count(&AdversaryStats::copies_delayed);
  count(&AdversaryStats::held);
  return c;
}

void Adversary::copy_released(uint64_t seq, bool started) {
  if (started) {
    MutexLock lk(ipc_mu_);
    if (copy_max_started_ > seq + 1) count(&AdversaryStats::reordered);
    copy_max_started_ = std::max(copy_max_started_, seq + 1);
  }
  copies_held_.fetch_sub(1, std::memory_order_acq_rel);
}

std::vector<uint64_t> Adversary::split_imms(uint64_t count_total) {
  uint64_t k = decisions_.fetch_add(1, std::memory_order_relaxed);
  uint64_t most = std::min<uint64_t>(o_.split, count_total);
  uint64_t parts = most <= 1 ? 1 : 1 + static_cast<uint64_t>(unit(k, 0, kSaltSplit) * double(most));
  if (parts <= 1) return {count_total};
  count(&AdversaryStats::imm_splits);
  std::vector<uint64_t> out(parts, count_total / parts);
  out.back() += count_total % parts;
  return out;
}

void Adversary::add_rule(uint32_t imm, uint32_t mask, uint64_t skip) {
  for (Rule& r : rules_)
    JG_CHECK_ARG(r.released || r.imm != imm || r.mask != mask, "adversary.hold: a rule for imm ", imm, " mask ", mask,
                 " is already active (release it first)");
  rules_.push_back(Rule{imm, mask, skip});
}

uint64_t Adversary::release_rule(uint32_t imm, uint32_t mask) {
  uint64_t n = 0;
  for (Rule& r : rules_) {
    if (r.released || r.imm != imm || r.mask != mask) continue;
    r.released = true;  // its pieces go in the worker's next pass
    n += r.held.size();
  }
  return n;
}

uint64_t Adversary::holding(uint32_t imm, uint32_t mask) const {
  uint64_t n = 0;
  for (const Rule& r : rules_)
    if (!r.released && r.imm == imm && r.mask == mask) n += r.held.size();
  return n;
}

}  // namespace jax_garden::fabric
