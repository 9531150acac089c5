#include "model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>
#include <torch/script.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>

#include "cuda_graph.h"
#include "errors.h"
#include "pool.h"

namespace blip3o {
namespace {

using Clock = std::chrono::steady_clock;
double msSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

bool cudaBuilt() {
  try {
    at::detail::getCUDAHooks().versionCUDART();  // the CPU-only stub throws
    return true;
  } catch (...) {
    return false;
  }
}

torch::ScalarType scalarType(const std::string& name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  return torch::kFloat32;
}

// Eager calls before a capture: lazy initialisation (library handles, workspaces, kernel choices)
// must not happen inside it.
constexpr int kWarmupCalls = 3;
// CPU: the most rows in one DiT call of a batch. Past 4 rows the bundled DiT's step costs more per row,
// not less: a batch of 8 images on two threads took 1177-1427 ms in its DiT loop as four calls of 4 rows,
// against 1266-1493 ms as two of 8 (same bytes; see the README's Performance section).
constexpr int64_t kDitCallRows = 4;

const char* const kBackboneMethods[] = {"condition", "embed", "encode_image", "new_cache", "prefill", "decode"};

// Freezing turns parameters into constants and inlines every submodule call into the methods'
// graphs, so a call runs without submodule calls or attribute lookups; with optimize_numerics off the arithmetic is the
// same (same bytes as the module as exported). The inliner takes each callee's optimised graph,
// which is inlined only while the graph executor optimises (a thread-local setting this thread
// otherwise keeps off), hence the guard. A module that cannot be frozen runs as exported.
torch::jit::Module frozen(const torch::jit::Module& module, const std::vector<std::string>& methods) {
  struct OptimizeGuard {
    bool was = torch::jit::getGraphExecutorOptimize();
    OptimizeGuard() { torch::jit::setGraphExecutorOptimize(true); }
    ~OptimizeGuard() { torch::jit::setGraphExecutorOptimize(was); }
  } guard;
  try {
    return torch::jit::freeze(module, methods, false);
  } catch (const c10::Error&) {
    return module;
  }
}

// On CPU, ATen picks a convolution's kernel at every call from its shapes and the calling thread's
// intra-op thread count (im2col + GEMM, whose MKL GEMM splits its sums over threads, or oneDNN), and
// the two round differently. Each convolution of a frozen float32 graph bound to one kernel gives the
// same bytes at any thread count, so a lone sample may run on every core: oneDNN for spatial kernels,
// with their weights channels-last (the caller passes channels-last inputs: oneDNN then reorders
// nothing; a tiny decoder step 4.6 against 5.1 ms in NCHW), im2col + GEMM for 1x1 ones (2-4x faster
// than oneDNN at batch 1). Returns false if a convolution was left to ATen's choice (the caller then
// keeps one thread).
bool bindConvolutions(torch::jit::Module& module) {
  using torch::jit::Node;
  using torch::jit::toIValue;
  static const auto conv2d = c10::Symbol::fromQualString("aten::conv2d");
  static const auto onednn = c10::Symbol::fromQualString("aten::mkldnn_convolution");
  static const auto im2col = c10::Symbol::fromQualString("aten::thnn_conv2d");
  bool bound = true;
  for (const auto& method : module.get_methods()) {
    auto graph = method.graph();
    std::vector<Node*> convs;
    torch::jit::DepthFirstGraphNodeIterator it(graph);
    for (Node* node = it.next(); node; node = it.next())
      if (node->kind() == conv2d) convs.push_back(node);
    for (Node* node : convs) {
      // conv2d(input, weight, bias, stride, padding, dilation, groups), all but the input constant once
      // frozen; the overload with a padding string ("same") is left alone
      auto weight = toIValue(node->input(1));
      auto stride = toIValue(node->input(3)), padding = toIValue(node->input(4));
      auto dilation = toIValue(node->input(5)), groups = toIValue(node->input(6));
      if (!weight || !weight->isTensor() || weight->toTensor().dim() != 4 ||
          weight->toTensor().scalar_type() != torch::kFloat32 || !padding || !padding->isIntList() || !stride ||
          !dilation || !groups) {
        bound = false;
        continue;
      }
      const auto k = weight->toTensor().sizes().slice(2).vec();
      const auto d = dilation->toIntVector();
      const bool spatial = k[0] > 1 || k[1] > 1;
      if (!spatial && (groups->toInt() != 1 || d[0] != 1 || d[1] != 1)) {
        bound = false;
        continue;
      }
      torch::jit::WithInsertPoint guard(node);
      auto* graphOf = node->owningGraph();
      Node* call = spatial ? graphOf->create(onednn, {node->input(0),
                                                      graphOf->insertConstant(weight->toTensor().contiguous(
                                                          at::MemoryFormat::ChannelsLast)),
                                                      node->input(2), node->input(4), node->input(3), node->input(5),
                                                      node->input(6)})
                           : graphOf->create(im2col, {node->input(0), node->input(1), graphOf->insertConstant(k),
                                                      node->input(2), node->input(3), node->input(4)});
      call->output()->setType(node->output()->type());
      graphOf->insertNode(call);
      node->output()->replaceAllUsesWith(call->output());
      node->destroy();
    }
  }
  return bound;
}

}  // namespace

RuntimeInfo runtimeInfo() {
  RuntimeInfo info;
  info.libtorch = TORCH_VERSION;
  info.cudaBuilt = cudaBuilt();
  info.cudaDevices = info.cudaBuilt ? int(torch::cuda::device_count()) : 0;
  info.defaultThreads = defaultThreads();
  return info;
}

namespace {

// Wall time spent inside module calls: each call records its interval, and a step counts the union
// of its intervals once, however many calls overlapped on the pool.
class CallSpans {
 public:
  void reset(size_t slots) { spans_.assign(slots, {}); }
  torch::Tensor time(size_t slot, const std::function<torch::Tensor()>& call) {
    auto t0 = Clock::now();
    torch::Tensor out = call();
    spans_[slot] = {t0, Clock::now()};
    return out;
  }
  double takeUnionMs() {
    std::sort(spans_.begin(), spans_.end());
    double total = 0;
    Clock::time_point end{};
    for (auto& [a, b] : spans_) {
      if (b <= end) continue;
      total += std::chrono::duration<double, std::milli>(b - std::max(a, end)).count();
      end = b;
    }
    reset(spans_.size());
    return total;
  }

 private:
  std::vector<std::pair<Clock::time_point, Clock::time_point>> spans_;
};

// A stage's accounting: time inside module calls and the wall time of each step.
struct StageClock {
  double callMs = 0;
  std::vector<double> stepMs;
};

}  // namespace

struct Model::Impl {
  Manifest manifest;
  std::string deviceName, dtypeName;
  torch::Device device{torch::kCPU};
  torch::ScalarType dtype = torch::kFloat32;
  torch::ScalarType vaeDtype = torch::kFloat32;  // the VAE's: dtype, or float32 where it must not run in float16
  torch::jit::Module backbone, dit, decoder, vae;
  bool ditPrepares = false;  // dit.pt has prepare() + step(): the condition's share is computed once per loop
  // Qwen2.5-VL's multimodal RoPE (manifest mropeSection): understanding prefills with 3-D positions and
  // decodes with decode_mrope (KV-cache slot and rope position apart); text alone gives the same as 1-D
  bool mrope = false;
  // CPU, float32: a lone sample's decoder and VAE calls run on every pool thread (see bindConvolutions)
  bool decoderWidens = false, vaeWidens = false;
  // ... with MKL's GEMMs on every thread too: only where checked at load to give the same bytes
  bool decoderWidensBlas = false;
  WidenChoice decoderWidening;  // a lone unguided decoder call: widened or on one thread
  torch::Tensor negative;  // [1, clip tokens, clip width] float32; set by prepareNegative
  // CUDA graphs (LoadOptions::cudaGraphs on CUDA), captured at the first use of each shape: the DiT
  // step by its rows, the decode step by its KV-cache length. A loop whose capture failed stays eager.
  struct DitGraph { torch::Tensor in, t; torch::IValue condition; std::unique_ptr<CudaGraph> graph; };
  struct DecodeGraph { torch::Tensor cache, input, slot, position; std::unique_ptr<CudaGraph> graph; };
  bool graphs = false;
  bool ditEager = false, decodeEager = false;
  std::map<int64_t, DitGraph> ditGraphs;
  std::map<int64_t, DecodeGraph> decodeGraphs;
  std::shared_ptr<GraphStatus> graphStatus = std::make_shared<GraphStatus>();
  // CPU only: the workers that run a batch's calls (see split()). Declared after the modules,
  // so it is destroyed (its threads joined) before them.
  std::unique_ptr<WorkerPool> pool;
  CallSpans spans;

  torch::TensorOptions f32() const { return torch::TensorOptions().dtype(torch::kFloat32).device(device); }

  torch::Tensor ids(const std::vector<int64_t>& v) const {
    return torch::from_blob(const_cast<int64_t*>(v.data()), {1, int64_t(v.size())}, torch::kLong).clone().to(device);
  }

  // Stage boundaries are timed; CUDA work is asynchronous, so wait for it first.
  void sync() const {
    if (device.is_cuda()) torch::cuda::synchronize();
  }

  torch::Tensor call(torch::jit::Module& m, std::vector<torch::IValue> args) { return m.forward(std::move(args)).toTensor(); }

  // A module's output must have the shape the loop relies on: a smaller one would otherwise broadcast
  // silently into the in-place updates (garbage, no error).
  static void expectShape(const char* what, const torch::Tensor& t, at::IntArrayRef shape) {
    if (t.sizes() == shape) return;
    throw Error(ErrorCode::Runtime, std::string(what) + " returned a tensor of shape " + shapeText(t.sizes()) +
                                        ", expected " + shapeText(shape));
  }
  static std::string shapeText(at::IntArrayRef shape) {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + "]";
  }

  // How `rows` rows (units of `unit` rows: a sample's) are split into module calls, as [first, first + n)
  // ranges. CUDA: one call (a step costs about the same for any small batch there). CPU, a batch-invariant
  // bundle: the rows spread evenly over the pool's threads, one call each (a lone sample's CFG halves on
  // two cores; a batch in a few large calls), or a multiple of the threads where that keeps every call
  // within `maxRows` rows (0: no limit). CPU, another bundle: one call per unit, the only split that
  // gives a sample its lone bytes there (MKL and OpenBLAS round a row differently depending on where it falls
  // in a GEMM); the pool runs them concurrently.
  std::vector<std::pair<int64_t, int64_t>> split(int64_t rows, int64_t unit, int64_t maxRows = 0) const {
    if (!pool) return {{0, rows}};
    std::vector<std::pair<int64_t, int64_t>> out;
    int64_t parts = manifest.batchInvariant ? std::min<int64_t>(rows, pool->size()) : rows / unit;
    if (manifest.batchInvariant && maxRows > 0)
      while (parts < rows && (rows + parts - 1) / parts > maxRows) parts = std::min(rows, parts + pool->size());
    for (int64_t k = 0, first = 0; k < parts; ++k) {
      const int64_t n = rows / parts + (k < rows % parts ? 1 : 0);
      out.push_back({first, n});
      first += n;
    }
    return out;
  }

  // Runs task(0..count-1): concurrently on the CPU pool, in order on CUDA.
  void parallel(size_t count, const std::function<void(int)>& task, bool widen = false, bool widenBlas = false) {
    spans.reset(count);
    if (pool) return pool->run(int(count), task, widen, widenBlas);
    for (size_t i = 0; i < count; ++i) task(int(i));
  }

  // [steps, n] model timesteps on the device, built once: a step only selects its row.
  torch::Tensor timestepRows(const std::vector<double>& t, int64_t n) const {
    return torch::tensor(t, torch::kFloat32).unsqueeze(1).expand({-1, n}).contiguous().to(device);
  }

  // A denoising loop's module calls. Its rows are CFG pairs, sample-major (`width` rows per sample),
  // split into calls by split(); a call's input is filled from its samples' rows by `spans` (sample,
  // first row in the call, rows), and each step's outputs land row by row in one buffer.
  struct Span { int64_t sample, row, rows; };
  struct RowCall { int64_t first, n; std::vector<Span> spans; torch::Tensor in, t; torch::IValue condition; };

  // The calls over B samples of rows shaped like `sample` [1, ...], at most maxRows rows each (see split);
  // condition(b, h) is row (b, h)'s condition [1, ...]; t: the loop's timesteps for the call's rows;
  // format: the inputs' memory format (channels-last for a module of bound convolutions).
  std::vector<RowCall> rowCalls(const torch::Tensor& sample, int64_t B, int64_t width, int64_t maxRows,
                                const std::vector<double>& timesteps,
                                const std::function<torch::Tensor(int64_t, int64_t)>& condition,
                                torch::MemoryFormat format = torch::MemoryFormat::Contiguous) const {
    std::vector<RowCall> calls;
    for (auto [first, n] : split(B * width, width, maxRows)) {
      RowCall c{first, n, {}, {}, {}, {}};
      std::vector<torch::Tensor> rows;
      for (int64_t r = first; r < first + n; ++r) {
        const int64_t b = r / width;
        if (c.spans.empty() || c.spans.back().sample != b) c.spans.push_back({b, r - first, 0});
        c.spans.back().rows++;
        rows.push_back(condition(b, r % width));
      }
      std::vector<int64_t> shape = sample.sizes().vec();
      shape[0] = n;
      c.in = torch::empty(shape, sample.options().dtype(dtype), format);
      c.t = timestepRows(timesteps, n);
      c.condition = torch::cat(rows).to(dtype);
      calls.push_back(std::move(c));
    }
    return calls;
  }

  // The outputs of a loop's step, [B, width, ...] float32 for samples shaped like `sample` [B, ...].
  static torch::Tensor pairOutputs(const torch::Tensor& sample, int64_t width) {
    std::vector<int64_t> shape = sample.sizes().vec();
    shape.insert(shape.begin() + 1, width);
    return torch::empty(shape, sample.options());
  }

  // One step of a loop: each call's input filled from `source` [B, ...], run by `run`, its output
  // checked and copied to its rows of `out` [B, width, ...] (pairOutputs).
  void stepCalls(std::vector<RowCall>& calls, const torch::Tensor& source, torch::Tensor& out, const char* file,
                 const std::function<torch::Tensor(RowCall&)>& run, bool widen, StageClock& clock,
                 bool widenBlas = false) {
    parallel(calls.size(), [&](int ci) {
      RowCall& c = calls[ci];
      for (const Span& sp : c.spans) {
        std::vector<int64_t> shape = source.sizes().vec();
        shape[0] = sp.rows;
        c.in.narrow(0, sp.row, sp.rows).copy_(source.narrow(0, sp.sample, 1).expand(shape));
      }
      torch::Tensor o = spans.time(ci, [&] { return run(c); });
      expectShape(file, o, c.in.sizes());
      out.flatten(0, 1).narrow(0, c.first, c.n).copy_(o);
    }, widen, widenBlas);
    clock.callMs += spans.takeUnionMs();
  }

  // The update after a step, over [first, first + n) sample ranges: one sample at a time on CPU, so
  // that its elementwise bytes never depend on the batch; the whole batch on CUDA.
  void eachSample(int64_t B, const std::function<void(int64_t, int64_t)>& update) const {
    for (int64_t b = 0, per = pool ? 1 : B; b < B; b += per) update(b, per);
  }

  // The fresh noise of a stochastic DiT loop (eta > 0): one [1,T,C] draw per step but the last, from
  // the sample's generator right after its initial noise; undefined for the deterministic loop.
  torch::Tensor stepNoise(at::Generator& gen, const DitSampling& s) const {
    if (s.eta <= 0) return {};
    const int64_t n = int64_t(s.sigmas.size()) - 2;
    return at::randn({n, 1, manifest.clipTokens, manifest.clipWidth}, gen, torch::kFloat32);
  }

  // Flow-matching Euler over x [B,T,C] (float32, updated in place); CFG pairs [uncond, cond] per sample
  // (see rowCalls); at guidance 1 or less the conditional branch runs alone, as in diffusers. The
  // update is in place with the same operations (and so the same bytes) as x + dsigma * (vu + cfg (vc - vu)).
  // With eta > 0 (noise: [steps - 1, B, T, C]) every step but the last goes from the prediction's clean
  // estimate x0 = x - sigma v and noise estimate x + (1 - sigma) v to
  // (1 - sigma') x0 + sigma' (sqrt(1 - eta^2) noise estimate + eta fresh noise).
  torch::Tensor runDit(const torch::Tensor& cond, torch::Tensor x, const DitSampling& s, const torch::Tensor& noise,
                       const JobHooks& hooks, bool report, StageClock& clock) {
    const int64_t steps = int64_t(s.timesteps.size()), B = x.size(0);
    const bool guided = s.cfg > 1;
    const int64_t width = guided ? 2 : 1;
    // A call's condition: what the step reads besides x and t, prepare()'s list or the condition itself.
    auto calls = rowCalls(x.narrow(0, 0, 1), B, width, kDitCallRows, s.timesteps, [&](int64_t b, int64_t h) {
      torch::Tensor c = cond.narrow(0, b, 1);
      return guided && h == 0 ? torch::zeros_like(c) : c;
    });
    if (ditPrepares) {
      hooks.check();
      parallel(calls.size(), [&](int ci) { calls[ci].condition = dit.run_method("prepare", calls[ci].condition); });
    }
    // CUDA: one call; with a graph the step reads the graph's buffers, the condition copied in once.
    DitGraph* graph = graphs ? ditGraph(calls[0].in, calls[0].t[0], calls[0].condition) : nullptr;
    if (graph) calls[0].in = graph->in;
    torch::Tensor pairs = pairOutputs(x, width);  // the velocities
    for (int64_t i = 0; i < steps; ++i) {
      hooks.check();
      auto t0 = Clock::now();
      stepCalls(calls, x, pairs, "dit.pt", [&](RowCall& c) {
        if (!graph) return ditStep(c.in, c.t[i], c.condition);
        graph->t.copy_(c.t[i]);
        return graph->graph->replay();
      }, false, clock);
      eachSample(B, [&](int64_t b, int64_t n) { update(x.narrow(0, b, n), pairs.narrow(0, b, n), s, i, noise, b); });
      if (report && hooks.progress) hooks.progress("dit", int(i + 1), int(steps));
      clock.stepMs.push_back(msSince(t0));
    }
    return x;
  }

  // One DiT step's update of x [n,T,C] (samples first..) from their velocities [n, width, T, C]; see runDit.
  static void update(torch::Tensor x, const torch::Tensor& pairs, const DitSampling& s, int64_t i,
                     const torch::Tensor& noise, int64_t first) {
    const int64_t steps = int64_t(s.timesteps.size()), n = x.size(0);
    torch::Tensor v = pairs.select(1, 0);
    if (pairs.size(1) == 2) v = (pairs.select(1, 1) - v).mul_(s.cfg).add_(v);
    if (noise.defined() && i + 1 < steps) {
      const double sigma = s.sigmas[i], next = s.sigmas[i + 1];
      torch::Tensor x0 = x - v * sigma;
      torch::Tensor eps = (x + v * (1 - sigma)).mul_(std::sqrt(1 - s.eta * s.eta));
      eps.add_(noise[i].narrow(0, first, n), s.eta);
      x.copy_(x0.mul_(1 - next).add_(eps, next));
    } else {
      x.add_(v.mul_(s.sigmas[i + 1] - s.sigmas[i]));
    }
  }

  torch::Tensor ditStep(const torch::Tensor& in, const torch::Tensor& t, const torch::IValue& condition) {
    return ditPrepares ? dit.run_method("step", in, t, condition).toTensor() : call(dit, {in, t, condition});
  }

  // A condition's tensors: prepare()'s list, or the one tensor.
  static std::vector<torch::Tensor> tensorsOf(const torch::IValue& v) {
    return v.isTensor() ? std::vector<torch::Tensor>{v.toTensor()} : v.toTensorVector();
  }

  // The DiT step's graph for in's rows, with this loop's condition copied into it; captured on copies
  // of the loop's buffers at the first use of these rows. nullptr: the DiT runs eagerly.
  DitGraph* ditGraph(const torch::Tensor& in, const torch::Tensor& t, const torch::IValue& condition) {
    if (ditEager) return nullptr;
    auto found = ditGraphs.find(in.size(0));
    if (found != ditGraphs.end()) {
      auto into = tensorsOf(found->second.condition), from = tensorsOf(condition);
      for (size_t k = 0; k < into.size(); ++k) into[k].copy_(from[k]);
      return &found->second;
    }
    DitGraph g;
    g.in = in.clone();
    g.t = t.clone();
    if (condition.isTensor()) {
      g.condition = condition.toTensor().clone();
    } else {
      c10::List<torch::Tensor> copies;
      for (const torch::Tensor& c : tensorsOf(condition)) copies.push_back(c.clone());
      g.condition = copies;
    }
    return keep(ditGraphs, in.size(0), g, [&] { return ditStep(g.in, g.t, g.condition); }, ditEager,
                &GraphStatus::Text::dit, "rows");
  }

  // The KV cache's length for `needed` positions. CUDA: rounded up to a power of two (at least 256, at
  // most the context), so that a few decode graphs serve every request, and the eager path uses the
  // same lengths (the same attention shapes, the same numbers). CPU: exact.
  int64_t cacheLength(int64_t needed) const {
    if (!device.is_cuda()) return needed;
    int64_t length = 256;
    while (length < needed) length *= 2;
    return std::max(needed, std::min(length, manifest.backbone.context));
  }

  // The decode step's graph and its static cache of this length; captured at first use, before the
  // prefill (warm-up and capture write position 0, which the prefill then overwrites). Cache entries
  // past a request's position are left from earlier requests: the decode mask hides them.
  // nullptr: decoding runs eagerly.
  DecodeGraph* decodeGraph(int64_t length) {
    if (decodeEager) return nullptr;
    auto found = decodeGraphs.find(length);
    if (found != decodeGraphs.end()) return &found->second;
    DecodeGraph g;
    g.cache = backbone.run_method("new_cache", 1, length).toTensor();
    g.input = torch::zeros({1, 1}, torch::TensorOptions().dtype(torch::kLong).device(device));
    g.position = torch::zeros({1}, g.input.options());
    g.slot = torch::zeros({1}, g.input.options());
    return keep(decodeGraphs, length, g, [&] { return decodeCall(g.input, g.slot, g.position, g.cache); },
                decodeEager, &GraphStatus::Text::decode, "cache positions");
  }

  // One decode step: the token at KV-cache index `slot`, rotated by `position` (the same without M-RoPE).
  torch::Tensor decodeCall(const torch::Tensor& input, const torch::Tensor& slot, const torch::Tensor& position,
                           const torch::Tensor& cache) {
    if (mrope) return backbone.run_method("decode_mrope", input, slot, position, cache).toTensor();
    return backbone.run_method("decode", input, position, cache).toTensor();
  }

  // The [3, L] rope positions of a prompt whose image (merged grid rows x cols) fills its image pad tokens,
  // as Qwen2.5-VL's get_rope_index gives them, and the rope delta of the tokens decoded after it (their
  // position is their cache index + delta). A text token takes (p, p, p) and advances p; the image's
  // token at (r, c) takes (s, s + r, s + c) where s is p at its start, and p becomes s + max(rows, cols).
  std::pair<torch::Tensor, int64_t> ropePositions(const std::vector<int64_t>& ids, int64_t rows, int64_t cols) const {
    const int64_t L = int64_t(ids.size());
    torch::Tensor pos = torch::empty({3, L}, torch::kLong);
    auto p3 = pos.accessor<int64_t, 2>();
    int64_t p = 0, i = 0;
    bool imageDone = false;
    while (i < L) {
      if (ids[i] != manifest.imagePadToken || imageDone) {
        p3[0][i] = p3[1][i] = p3[2][i] = p;
        ++p, ++i;
        continue;
      }
      for (int64_t k = 0; k < rows * cols; ++k, ++i) {
        if (i >= L || ids[i] != manifest.imagePadToken)
          throw Error(ErrorCode::InvalidArgument, "the prompt has fewer image pad tokens than the image has merged tokens");
        p3[0][i] = p, p3[1][i] = p + k / cols, p3[2][i] = p + k % cols;
      }
      p += std::max(rows, cols);
      imageDone = true;
    }
    return {pos.to(device), p - L};
  }

  // Captures `call`, which reads g's buffers, as g's graph and keeps g under `key`; the loop's status
  // then lists the shapes captured so far ("captured for 2 rows, 8 rows"). If capture fails, the loop
  // stays eager from then on, its status says why, and this returns nullptr.
  template <class G>
  G* keep(std::map<int64_t, G>& graphs, int64_t key, G& g, const std::function<torch::Tensor()>& call, bool& eager,
          std::string GraphStatus::Text::*status, const char* unit) {
    try {
      g.graph = CudaGraph::capture(call, kWarmupCalls);
    } catch (const Error& e) {
      eager = true;
      graphStatus->set(status, std::string("eager (") + e.what() + ")");
      return nullptr;
    }
    G& kept = graphs[key] = std::move(g);
    std::string shapes;
    for (auto& [size, graph] : graphs) shapes += (shapes.empty() ? "" : ", ") + std::to_string(size) + " " + unit;
    graphStatus->set(status, "graph (captured for " + shapes + ")");
    return &kept;
  }

  // Whether a lone decoder call gives the same bytes with MKL's GEMMs on every pool thread as on one
  // (MKL splits some products' sums over threads: it depends on their shapes, which a bundle fixes).
  // One call each way on a seeded input, at load; a decoder that fails here says so when it is used.
  bool blasWideningKeepsBytes() try {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
    torch::Tensor z = at::randn({1, manifest.latentChannels, manifest.latentHeight, manifest.latentWidth}, gen,
                                torch::kFloat32)
                          .contiguous(imageFormat(true));
    torch::Tensor t = torch::full({1}, 500.0f), features = at::randn({1, manifest.clipTokens, manifest.clipWidth}, gen,
                                                                     torch::kFloat32);
    torch::Tensor out[2];
    for (bool blas : {false, true})
      pool->run(1, [&](int) { out[blas] = call(decoder, {z, t, features}); }, true, blas);
    return torch::equal(out[0], out[1]);
  } catch (const std::exception&) {
    return false;
  }

  // The memory format of a convolutional module's inputs: channels-last where its convolutions were bound
  // (see bindConvolutions).
  static torch::MemoryFormat imageFormat(bool bound) {
    return bound ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  }

  // Euler discrete (k-diffusion form) over z [B,c,h,w] (float32, updated in place); CFG pairs
  // [cond, negative] per sample (see rowCalls), no negative at guidance 1 or less.
  void runDecoder(const torch::Tensor& features, torch::Tensor& z, const GenerateRequest& req, const JobHooks& hooks,
                  StageClock& clock) {
    const int64_t steps = int64_t(req.decoderTimesteps.size()), B = z.size(0);
    const bool guided = req.decoderCfg > 1;
    const int64_t width = guided ? 2 : 1;
    auto calls = rowCalls(z.narrow(0, 0, 1), B, width, 0, req.decoderTimesteps,
                          [&](int64_t b, int64_t h) { return h == 0 ? features.narrow(0, b, 1) : negative; },
                          imageFormat(decoderWidens));
    torch::Tensor pairs = pairOutputs(z, width);  // the model's outputs
    // one call that could use every pool thread (see WidenChoice)
    const bool lone = decoderWidens && calls.size() == 1 && pool && pool->size() > 1;
    for (int64_t i = 0; i < steps; ++i) {
      hooks.check();
      auto t0 = Clock::now();
      const double s = req.decoderSigmas[i], dsigma = req.decoderSigmas[i + 1] - s;
      const bool widen = lone && decoderWidening.next();
      auto c0 = Clock::now();
      // the input scale in float32, as diffusers' scale_model_input computes it from its float32 sigma
      const float scale = std::sqrt(float(float(s) * float(s)) + 1.0f);
      stepCalls(calls, z / scale, pairs, "decoder.pt",
                [&](RowCall& c) { return call(decoder, {c.in, c.t[i], c.condition}); }, widen, clock,
                decoderWidensBlas);
      if (lone) decoderWidening.record(widen, msSince(c0));
      eachSample(B, [&](int64_t b, int64_t n) {
        torch::Tensor x = z.narrow(0, b, n), out = pairs.narrow(0, b, n).select(1, 0);
        if (guided) {
          torch::Tensor negativeOut = pairs.narrow(0, b, n).select(1, 1);
          out = (out - negativeOut).mul_(req.decoderCfg).add_(negativeOut);  // negative + cfg (cond - negative)
        }
        torch::Tensor denoised;
        if (manifest.decoder.predictionType == "epsilon")
          denoised = x - out.mul_(s);
        else if (manifest.decoder.predictionType == "sample")
          denoised = out;
        else  // v_prediction
          denoised = out * (-s / std::sqrt(s * s + 1)) + x / (s * s + 1);
        x.add_(((x - denoised) / s).mul_(dsigma));
      });
      if (hooks.progress) hooks.progress("decoder", int(i + 1), int(steps));
      clock.stepMs.push_back(msSince(t0));
    }
  }

  // Greedy, or temperature softmax over the top-k then top-p candidates, drawn from `gen`.
  static int64_t pickToken(const torch::Tensor& logitsCpu, const DescribeRequest& req, at::Generator& gen) {
    const float* l = logitsCpu.data_ptr<float>();
    const int64_t V = logitsCpu.numel();
    if (req.temperature == 0) return int64_t(std::max_element(l, l + V) - l);
    std::vector<int64_t> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    const int64_t k = req.topK > 0 ? std::min(req.topK, V) : V;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [l](int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    idx.resize(k);
    std::vector<double> p(k);
    const double top = l[idx[0]] / req.temperature;
    double sum = 0;
    for (int64_t i = 0; i < k; ++i) sum += p[i] = std::exp(l[idx[i]] / req.temperature - top);
    int64_t keep = 0;
    double kept = 0;
    while (keep < k) {
      kept += p[keep++];
      if (kept >= req.topP * sum) break;
    }
    double u = at::rand({1}, gen, torch::kDouble).item<double>() * kept;
    for (int64_t i = 0; i < keep; ++i)
      if ((u -= p[i]) < 0) return idx[i];
    return idx[keep - 1];
  }
};

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;
const Manifest& Model::manifest() const { return impl_->manifest; }
const std::string& Model::device() const { return impl_->deviceName; }
const std::string& Model::dtype() const { return impl_->dtypeName; }
std::shared_ptr<const GraphStatus> Model::graphStatus() const { return impl_->graphStatus; }

std::unique_ptr<Model> Model::load(const std::string& bundleDir, const LoadOptions& options,
                                   const std::function<void()>& check) {
  auto impl = std::make_unique<Impl>();
  impl->manifest = readManifest(bundleDir);

  const bool cuda = torch::cuda::is_available();
  if (options.device == "cuda" && !cuda)
    throw Error(ErrorCode::Device, cudaBuilt() ? "device 'cuda' requested but no CUDA device is available"
                                               : "device 'cuda' requested but this libtorch (" TORCH_VERSION
                                                 ") was built without CUDA");
  impl->device = (options.device == "cuda" || (options.device == "auto" && cuda)) ? torch::Device(torch::kCUDA)
                                                                                    : torch::Device(torch::kCPU);
  impl->deviceName = impl->device.is_cuda() ? "cuda" : "cpu";
  if (options.dtype != "auto")
    impl->dtypeName = options.dtype;
  else if (impl->device.is_cuda())
    impl->dtypeName = impl->manifest.dtype == "float32" ? "bfloat16" : impl->manifest.dtype;
  else
    impl->dtypeName = "float32";
  if (impl->dtypeName == "float16" && !impl->device.is_cuda())
    throw Error(ErrorCode::InvalidArgument, "dtype float16 is not supported on cpu (use float32 or bfloat16)");
  impl->dtype = scalarType(impl->dtypeName);
  verifyFiles(impl->manifest, check);  // after the cheap checks: hashing a large bundle takes a while

  // Loading is not inference: keep ordinary tensors so that Module::to can replace parameter data.
  c10::InferenceMode notInference(false);
  torch::NoGradGuard noGrad;
  // `optional` methods are kept (frozen with the rest) when the file has them.
  auto loadModule = [&](const char* key, std::vector<const char*> methods, std::vector<const char*> optional = {},
                        std::optional<torch::ScalarType> dtype = std::nullopt) {
    if (check) check();
    const BundleFile& file = impl->manifest.files.at(key);
    torch::jit::Module module;
    try {
      module = torch::jit::load(file.realPath, impl->device);
    } catch (const c10::Error& e) {
      throw Error(ErrorCode::Bundle, "could not load " + file.path + ": " + oneLine(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw Error(ErrorCode::Bundle, "could not load " + file.path + ": " + oneLine(e.what()));
    }
    for (const char* method : methods)
      if (!module.find_method(method))
        throw Error(ErrorCode::Bundle, file.path + " has no method '" + method + "' (required by bundle format 1)");
    for (const char* method : optional)
      if (module.find_method(method)) methods.push_back(method);
    module.eval();
    module.to(dtype.value_or(impl->dtype));
    return frozen(module, {methods.begin(), methods.end()});
  };
  impl->backbone = loadModule("backbone", {std::begin(kBackboneMethods), std::end(kBackboneMethods)},
                              {"prefill_mrope", "decode_mrope"});
  impl->mrope = !impl->manifest.mropeSection.empty();
  if (impl->mrope && !(impl->backbone.find_method("prefill_mrope") && impl->backbone.find_method("decode_mrope")))
    throw Error(ErrorCode::Bundle, impl->manifest.files.at("backbone").path +
                                       " has no prefill_mrope / decode_mrope, which architecture.backbone.mrope_section needs");
  impl->dit = loadModule("dit", {"forward"}, {"prepare", "step"});
  impl->ditPrepares = impl->dit.find_method("prepare") && impl->dit.find_method("step");
  impl->decoder = loadModule("decoder", {"forward"});
  // SDXL's VAE overflows in float16 (its config's force_upcast): it then decodes in float32, as diffusers does
  impl->vaeDtype = impl->manifest.vaeForceUpcast && impl->dtype == torch::kFloat16 ? torch::kFloat32 : impl->dtype;
  impl->vae = loadModule("vae", {"forward"}, {}, impl->vaeDtype);
  if (!impl->device.is_cuda() && impl->dtype == torch::kFloat32) {
    impl->decoderWidens = bindConvolutions(impl->decoder);
    impl->vaeWidens = bindConvolutions(impl->vae);
  }
  if (!impl->device.is_cuda()) impl->pool = std::make_unique<WorkerPool>(options.threads);
  if (impl->decoderWidens && impl->pool->size() > 1) impl->decoderWidensBlas = impl->blasWideningKeepsBytes();
  impl->graphs = impl->device.is_cuda() && options.cudaGraphs;
  const char* graphs = !impl->device.is_cuda() ? "off (cpu)"
                       : options.cudaGraphs    ? "graph (captured at first use)"
                                               : "off (cudaGraphs: false)";
  impl->graphStatus->set(&GraphStatus::Text::dit, graphs);
  impl->graphStatus->set(&GraphStatus::Text::decode, graphs);
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

void Model::prepareNegative(const NegativeRequest& req, const JobHooks& hooks) {
  Impl& m = *impl_;
  validate(m.manifest, req);
  torch::Tensor cond;
  m.parallel(1, [&](int) { cond = m.backbone.run_method("condition", m.ids(req.ids)).toTensor(); });
  auto gen = at::make_generator<at::CPUGeneratorImpl>(req.seed);
  torch::Tensor eps = at::randn({1, m.manifest.clipTokens, m.manifest.clipWidth}, gen, torch::kFloat32).to(m.device);
  torch::Tensor noise = m.stepNoise(gen, req.dit);
  StageClock clock;
  m.negative = m.runDit(cond, eps, req.dit, noise.defined() ? noise.to(m.device) : noise, hooks, false, clock);
}

GenerateResult Model::generate(const GenerateRequest& req, const JobHooks& hooks) {
  Impl& m = *impl_;
  const Manifest& mf = m.manifest;
  validate(mf, req);
  if (!m.negative.defined())
    throw Error(ErrorCode::InvalidArgument, "generate needs the negative features: call prepareNegative first");
  const int B = int(req.prompts.size());
  GenerateResult result;
  auto t0 = Clock::now(), stage = t0;

  // One condition call per prompt: prompts differ in length and are never padded. Each on one thread:
  // MKL's GEMMs round differently at other thread counts for most of the backbone's shapes.
  hooks.check();
  std::vector<torch::Tensor> conds(B);
  m.parallel(B, [&](int b) {
    conds[b] = m.spans.time(b, [&] { return m.backbone.run_method("condition", m.ids(req.prompts[b])).toTensor(); });
  });
  result.conditionCallMs = m.spans.takeUnionMs();
  if (hooks.progress)
    for (int b = 0; b < B; ++b) hooks.progress("condition", b + 1, B);
  // Noise per sample from its own generator, so a sample never depends on its batch.
  std::vector<torch::Tensor> epsDit, epsDec, stepNoises;
  for (int b = 0; b < B; ++b) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(req.seeds[b]);
    epsDit.push_back(at::randn({1, mf.clipTokens, mf.clipWidth}, gen, torch::kFloat32));
    if (torch::Tensor n = m.stepNoise(gen, req.dit); n.defined()) stepNoises.push_back(n);
    epsDec.push_back(at::randn({1, mf.latentChannels, mf.latentHeight, mf.latentWidth}, gen, torch::kFloat32));
  }
  torch::Tensor noise = stepNoises.empty() ? torch::Tensor() : torch::cat(stepNoises, 1).to(m.device);
  m.sync();
  result.conditionMs = msSince(stage);

  stage = Clock::now();
  StageClock dit;
  torch::Tensor features = m.runDit(torch::cat(conds), torch::cat(epsDit).to(m.device), req.dit, noise, hooks, true, dit);
  m.sync();
  result.ditMs = msSince(stage);
  result.ditCallMs = dit.callMs;
  result.ditStepMs = std::move(dit.stepMs);

  stage = Clock::now();
  StageClock decoder;
  torch::Tensor z = torch::cat(epsDec).to(m.device) * req.decoderInitSigma;
  m.runDecoder(features, z, req, hooks, decoder);
  m.sync();
  result.decoderMs = msSince(stage);
  result.decoderCallMs = decoder.callMs;
  result.decoderStepMs = std::move(decoder.stepMs);

  stage = Clock::now();
  hooks.check();
  auto groups = m.split(B, 1);
  std::vector<torch::Tensor> images(groups.size());
  m.parallel(groups.size(), [&](int g) {
    torch::Tensor latents = (z.narrow(0, groups[g].first, groups[g].second) / mf.vaeScalingFactor)
                                .to(m.vaeDtype)
                                .contiguous(Impl::imageFormat(m.vaeWidens));
    torch::Tensor image = m.spans.time(g, [&] { return m.call(m.vae, {latents}); });
    Impl::expectShape("vae.pt", image, {groups[g].second, 3, mf.imageHeight, mf.imageWidth});
    images[g] = image.to(torch::kFloat32);
  }, m.vaeWidens);
  result.vaeCallMs = m.spans.takeUnionMs();
  torch::Tensor pixels = (torch::cat(images) / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch::kUInt8);
  pixels = pixels.permute({0, 2, 3, 1}).contiguous().cpu();
  result.vaeMs = msSince(stage);
  if (hooks.progress) hooks.progress("vae", 1, 1);

  result.count = pixels.size(0);
  result.height = pixels.size(1);
  result.width = pixels.size(2);
  if (pixels.size(3) != 3) throw Error(ErrorCode::Runtime, "vae.pt returned " + std::to_string(pixels.size(3)) + " channels, expected 3");
  result.pixels.assign(pixels.data_ptr<uint8_t>(), pixels.data_ptr<uint8_t>() + pixels.numel());
  result.totalMs = msSince(t0);
  return result;
}

DescribeResult Model::describe(const DescribeRequest& req, const JobHooks& hooks) {
  Impl& m = *impl_;
  const Manifest& mf = m.manifest;
  validate(mf, req);
  DescribeResult result;
  const int64_t L = int64_t(req.ids.size());
  result.promptTokens = L;
  auto t0 = Clock::now();

  torch::Tensor ids = m.ids(req.ids);
  torch::Tensor embeds = m.backbone.run_method("embed", ids).toTensor();
  if (!req.pixels.empty()) {
    torch::Tensor pixels = torch::from_blob(const_cast<float*>(req.pixels.data()), {1, 3, req.height, req.width})
                               .to(m.device, m.dtype, false, true);
    torch::Tensor image = m.backbone.run_method("encode_image", pixels).toTensor();
    torch::Tensor slots = (ids[0] == mf.imagePadToken).nonzero().squeeze(1);
    if (image.dim() != 2 || image.size(0) != slots.size(0))
      throw Error(ErrorCode::Runtime, "encode_image returned " + std::to_string(image.dim() == 2 ? image.size(0) : -1) +
                                          " tokens for " + std::to_string(slots.size(0)) + " image pad tokens");
    embeds = embeds.clone();
    embeds[0].index_put_({slots}, image.to(embeds.dtype()));
  }
  hooks.check();  // between the image encoder and the prefill
  const int64_t cacheLength = m.cacheLength(L + req.maxTokens);
  Impl::DecodeGraph* graph = m.graphs ? m.decodeGraph(cacheLength) : nullptr;
  torch::Tensor cache = graph ? graph->cache : m.backbone.run_method("new_cache", 1, cacheLength).toTensor();
  // M-RoPE: an image prompt's 3-D positions (text alone: 1-D, delta 0)
  int64_t delta = 0;
  torch::Tensor logits;
  if (m.mrope) {
    const int64_t unit = mf.vision.patch * mf.vision.merge;
    torch::Tensor positions;
    if (req.pixels.empty())
      positions = torch::arange(L, ids.options()).expand({3, L});
    else
      std::tie(positions, delta) = m.ropePositions(req.ids, req.height / unit, req.width / unit);
    logits = m.backbone.run_method("prefill_mrope", embeds, positions, cache).toTensor();
  } else {
    logits = m.backbone.run_method("prefill", embeds, cache).toTensor();
  }
  m.sync();
  result.prefillMs = msSince(t0);

  auto t1 = Clock::now();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(req.seed);
  while (true) {
    hooks.check();
    int64_t token = Impl::pickToken(logits[0].to(torch::kCPU, torch::kFloat32).contiguous(), req, gen);
    if (std::find(req.stopIds.begin(), req.stopIds.end(), token) != req.stopIds.end()) {
      result.stopped = true;
      break;
    }
    result.tokens.push_back(token);
    if (hooks.token) hooks.token(token);
    if (int64_t(result.tokens.size()) >= req.maxTokens) break;
    const int64_t slot = L + int64_t(result.tokens.size()) - 1, position = slot + delta;
    if (graph) {
      graph->input.fill_(token);
      graph->slot.fill_(slot);
      graph->position.fill_(position);
      logits = graph->graph->replay();
    } else {
      auto longs = torch::TensorOptions().dtype(torch::kLong).device(m.device);
      logits = m.decodeCall(torch::full({1, 1}, token, longs), torch::full({1}, slot, longs),
                            torch::full({1}, position, longs), cache);
    }
  }
  result.decodeMs = msSince(t1);
  return result;
}

}  // namespace blip3o
