// The emulator's scheduler: fibers for the threads of a block, barriers for the collectives, a host thread pool
// for the blocks, and the runtime API. See emu.h for what is and is not modelled.
#include "emu.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace opdcore_emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute, as on every NVIDIA GPU
constexpr unsigned kMaxThreadsPerBlock = 1024;

// ---- context switch ---------------------------------------------------------------------------------------
#if defined(__x86_64__)
// switch_to(save, to): saves the callee-saved registers and the FP control words on the current stack, stores
// the stack pointer in *save, and resumes the context whose stack pointer is `to`.
extern "C" void opdcore_emu_switch(void** save, void* to);
asm(R"(
.text
.p2align 4
.globl opdcore_emu_switch
.hidden opdcore_emu_switch
.type opdcore_emu_switch,@function
opdcore_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size opdcore_emu_switch, .-opdcore_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { opdcore_emu_switch(&from.sp, to.sp); }

// A fresh stack that "returns" into entry(): 8 bytes of FP control words, six registers, the return address.
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                      // entry's (never used) return address: rsp % 16 == 8 at entry
  *--sp = reinterpret_cast<uint64_t>(entry);      // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;          // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---- one block's fibers ----------------------------------------------------------------------------------
enum class Wait { kNone, kWarp, kBlock, kDone };
enum class Op { kNone, kSyncWarp, kBallot, kShfl };

const char* op_name(Op o) {
  switch (o) {
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kBallot: return "__ballot_sync/__any_sync";
    case Op::kShfl: return "__shfl_xor_sync";
    default: return "none";
  }
}

struct Fiber {
  Context ctx;
  std::unique_ptr<char[]> stack;
  ThreadIds ids;
  Wait wait = Wait::kNone;
  int warp = 0, lane = 0;
};

struct WarpState {
  int arrived = 0, live = 0;
  Op op = Op::kNone;
  uint64_t slot[32];
  int arg[32];
  uint64_t result[32];
};

class Emulation;
thread_local Emulation* t_emu = nullptr;

// Runs one block at a time on whichever host thread points t_emu at it; fiber stacks are allocated once.
class Emulation {
 public:
  Emulation(dim3 block, size_t smem, const std::function<void()>& body, unsigned seed)
      : body_(body), nthreads_(block.x * block.y * block.z), smem_(smem), rng_(seed), shuffle_(seed != 0) {
    fibers_.resize(nthreads_);
    for (auto& f : fibers_) f.stack.reset(new char[kStackBytes]);
    warps_.resize((nthreads_ + 31) / 32);
    dyn_.reset(new unsigned char[smem_ ? smem_ : 1]);
    order_.resize(nthreads_);
    for (unsigned i = 0; i < nthreads_; ++i) order_[i] = i;
  }

  void run_block(uint3 b, dim3 block, dim3 grid) {
    std::memset(dyn_.get(), 0xcd, smem_ ? smem_ : 1);
    done_ = 0;
    block_arrived_ = 0;
    block_or_ = false;
    error_.clear();
    for (auto& w : warps_) { w.arrived = 0; w.live = 0; w.op = Op::kNone; }
    for (unsigned t = 0; t < nthreads_; ++t) {
      Fiber& f = fibers_[t];
      f.ids.thread = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      f.ids.block = b;
      f.ids.block_dim = block;
      f.ids.grid_dim = grid;
      f.wait = Wait::kNone;
      f.warp = int(t / 32);
      f.lane = int(t % 32);
      ++warps_[f.warp].live;
      make_context(f.ctx, f.stack.get(), kStackBytes, &Emulation::entry);
    }
    while (done_ < nthreads_ && error_.empty()) {
      if (shuffle_) std::shuffle(order_.begin(), order_.end(), rng_);
      bool progressed = false;
      for (unsigned i : order_) {
        Fiber& f = fibers_[i];
        if (f.wait != Wait::kNone) continue;
        cur_ = &f;
        switch_context(sched_, f.ctx);
        cur_ = nullptr;
        progressed = true;
        if (!error_.empty()) break;
      }
      if (!progressed && error_.empty()) error_ = "deadlock: " + describe_waits();
    }
    if (!error_.empty())
      throw std::runtime_error("block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
                               std::to_string(b.z) + "): " + error_);
  }

  Fiber& cur() { return *cur_; }
  unsigned char* dynamic_smem() { return dyn_.get(); }

  // Fails the block (from inside a fiber) and never returns.
  [[noreturn]] void fail(const std::string& msg) {
    if (error_.empty()) error_ = msg;
    cur_->wait = Wait::kDone;
    for (;;) switch_context(cur_->ctx, sched_);
  }

  void sync_block(bool pred, bool* out) {
    if (done_ > 0) fail("__syncthreads reached after " + std::to_string(done_) + " thread(s) of the block exited");
    block_or_ = block_or_ || pred;
    if (++block_arrived_ < nthreads_) {
      cur_->wait = Wait::kBlock;
      yield();
      *out = block_result_;
      return;
    }
    // last to arrive: release everyone
    block_result_ = block_or_;
    block_or_ = false;
    block_arrived_ = 0;
    for (auto& g : fibers_)
      if (g.wait == Wait::kBlock) g.wait = Wait::kNone;
    *out = block_result_;
  }

  uint64_t warp_op(Op op, uint64_t value, int arg) {
    Fiber& f = *cur_;
    WarpState& w = warps_[f.warp];
    if (w.live != 32)
      fail(std::string(op_name(op)) + " with the full mask in warp " + std::to_string(f.warp) + " after " +
           std::to_string(32 - w.live) + " of its lanes exited");
    if (w.arrived == 0) w.op = op;
    else if (w.op != op)
      fail("lanes of warp " + std::to_string(f.warp) + " are in different collectives (" + op_name(w.op) + " and " +
           op_name(op) + ")");
    w.slot[f.lane] = value;
    w.arg[f.lane] = arg;
    if (++w.arrived < 32) {
      f.wait = Wait::kWarp;
      yield();
      return w.result[f.lane];
    }
    // last lane: form every lane's result, release the warp
    uint64_t mask = 0;
    for (int l = 0; l < 32; ++l) mask |= (w.slot[l] != 0 ? 1ull : 0ull) << l;
    for (int l = 0; l < 32; ++l) {
      if (op == Op::kShfl) {
        const int src = l ^ w.arg[l];
        w.result[l] = src < 32 ? w.slot[src] : w.slot[l];
      } else {
        w.result[l] = mask;
      }
    }
    w.arrived = 0;
    w.op = Op::kNone;
    for (int l = 0; l < 32; ++l) {
      Fiber& g = fibers_[f.warp * 32 + l];
      if (g.wait == Wait::kWarp) g.wait = Wait::kNone;
    }
    return w.result[f.lane];
  }

 private:
  static void entry() {
    Emulation* e = t_emu;
    try {
      e->body_();
    } catch (const std::exception& ex) {
      if (e->error_.empty()) e->error_ = std::string("exception in a kernel: ") + ex.what();
    } catch (...) {
      if (e->error_.empty()) e->error_ = "unknown exception in a kernel";
    }
    Fiber& f = *e->cur_;
    f.wait = Wait::kDone;
    ++e->done_;
    --e->warps_[f.warp].live;
    WarpState& w = e->warps_[f.warp];
    if (w.arrived > 0 && e->error_.empty())
      e->error_ = "thread " + std::to_string(f.ids.thread.x) + " exited while lanes of its warp wait in " +
                  op_name(w.op);
    if (e->block_arrived_ > 0 && e->error_.empty())
      e->error_ = "thread " + std::to_string(f.ids.thread.x) + " exited while other threads wait in __syncthreads";
    for (;;) switch_context(f.ctx, e->sched_);
  }

  void yield() { switch_context(cur_->ctx, sched_); }

  std::string describe_waits() const {
    std::string s;
    for (size_t w = 0; w < warps_.size(); ++w) {
      int nb = 0, nw = 0;
      for (int l = 0; l < 32 && w * 32 + l < fibers_.size(); ++l) {
        const Fiber& f = fibers_[w * 32 + l];
        nb += f.wait == Wait::kBlock;
        nw += f.wait == Wait::kWarp;
      }
      if (nb || nw)
        s += "warp " + std::to_string(w) + ": " + std::to_string(nb) + " lanes in __syncthreads, " +
             std::to_string(nw) + " in " + op_name(warps_[w].op) + "; ";
    }
    return s;
  }

  const std::function<void()>& body_;
  unsigned nthreads_;
  size_t smem_;
  std::mt19937 rng_;
  bool shuffle_;
  std::vector<Fiber> fibers_;
  std::vector<WarpState> warps_;
  std::vector<unsigned> order_;
  std::unique_ptr<unsigned char[]> dyn_;
  Context sched_;
  Fiber* cur_ = nullptr;
  unsigned done_ = 0, block_arrived_ = 0;
  bool block_or_ = false, block_result_ = false;
  std::string error_;
};

// ---- runtime state --------------------------------------------------------------------------------------
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

unsigned env_unsigned(const char* name, unsigned fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? unsigned(std::strtoul(v, nullptr, 10)) : fallback;
}

void set_error(cudaError_t e, const std::string& msg) {
  if (t_last_error == cudaSuccess) {
    t_last_error = e;
    t_last_message = msg;
  }
}

}  // namespace

const ThreadIds& ids() { return t_emu->cur().ids; }
void sync_block() {
  bool out;
  t_emu->sync_block(false, &out);
}
bool sync_block_or(bool pred) {
  bool out;
  t_emu->sync_block(pred, &out);
  return out;
}
void sync_warp() { t_emu->warp_op(Op::kSyncWarp, 0, 0); }
uint32_t ballot(bool pred) { return uint32_t(t_emu->warp_op(Op::kBallot, pred ? 1 : 0, 0)); }
uint64_t shfl_xor(uint64_t bits, int lane_mask) { return t_emu->warp_op(Op::kShfl, bits, lane_mask); }
unsigned char* dynamic_smem() { return t_emu->dynamic_smem(); }

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreadsPerBlock || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  if (smem > kMaxDynamicSmem) {
    set_error(cudaErrorInvalidValue, "dynamic shared memory of " + std::to_string(smem) + " bytes (> 48 KiB)");
    return;
  }
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const unsigned seed = env_unsigned("OPDCORE_EMU_SEED", 0);
  unsigned workers = env_unsigned("OPDCORE_EMU_THREADS", std::max(1u, std::thread::hardware_concurrency()));
  workers = unsigned(std::min<uint64_t>(std::max(1u, workers), nblocks));
  // Each block runs on a fresh host thread: its __shared__ variables (thread_local statics) start zeroed, not
  // holding the previous block's values, so a kernel that reads shared memory before initialising it (or before
  // the barrier after the initialisation) sees zeros, not a plausible leftover. Fiber stacks are reused.
  std::vector<std::unique_ptr<Emulation>> emus;
  for (unsigned w = 0; w < workers; ++w) emus.emplace_back(new Emulation(block, smem, body, seed ? seed + w : 0));
  std::string first_error;
  std::vector<std::string> errors(workers);
  for (uint64_t first = 0; first < nblocks && first_error.empty(); first += workers) {
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < workers && first + w < nblocks; ++w) {
      const uint64_t i = first + w;
      const uint3 b{unsigned(i % grid.x), unsigned((i / grid.x) % grid.y), unsigned(i / (uint64_t(grid.x) * grid.y))};
      pool.emplace_back([&, w, b] {
        t_emu = emus[w].get();
        try {
          emus[w]->run_block(b, block, grid);
        } catch (const std::exception& e) {
          errors[w] = e.what();
        }
      });
    }
    for (auto& t : pool) t.join();
    for (auto& e : errors)
      if (first_error.empty() && !e.empty()) first_error = e;
  }
  if (!first_error.empty()) set_error(cudaErrorLaunchFailure, first_error);
}

}  // namespace opdcore_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = opdcore_emu::t_last_error;
  opdcore_emu::t_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  thread_local std::string msg;
  msg = "emulated CUDA error " + std::to_string(int(e)) +
        (opdcore_emu::t_last_message.empty() ? std::string() : ": " + opdcore_emu::t_last_message);
  return msg.c_str();
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = int(opdcore_emu::env_unsigned("OPDCORE_EMU_SMS", 132));
  return cudaSuccess;
}
