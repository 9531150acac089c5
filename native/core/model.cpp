#include "model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <numeric>

#include "errors.h"

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

const char* const kBackboneMethods[] = {"condition", "embed", "encode_image", "new_cache", "prefill", "decode"};

}  // namespace

RuntimeInfo runtimeInfo() {
  RuntimeInfo info;
  info.libtorch = TORCH_VERSION;
  info.cudaBuilt = cudaBuilt();
  info.cudaDevices = info.cudaBuilt ? int(torch::cuda::device_count()) : 0;
  info.defaultThreads = at::get_num_threads();
  return info;
}

struct Model::Impl {
  Manifest manifest;
  std::string deviceName, dtypeName;
  torch::Device device{torch::kCPU};
  torch::ScalarType dtype = torch::kFloat32;
  torch::jit::Module backbone, dit, decoder, vae;
  torch::Tensor negative;  // [1, clip tokens, clip width] float32; set by prepareNegative
  bool exactBatches = true;  // see perSample

  torch::TensorOptions f32() const { return torch::TensorOptions().dtype(torch::kFloat32).device(device); }

  torch::Tensor ids(const std::vector<int64_t>& v) const {
    return torch::from_blob(const_cast<int64_t*>(v.data()), {1, int64_t(v.size())}, torch::kLong).clone().to(device);
  }

  // Stage boundaries are timed; CUDA work is asynchronous, so wait for it first.
  void sync() const {
    if (device.is_cuda()) torch::cuda::synchronize();
  }

  torch::Tensor call(torch::jit::Module& m, std::vector<torch::IValue> args) { return m.forward(std::move(args)).toTensor(); }

  // Calls `fn(first, count)` on sample ranges and concatenates the results. On CPU one call per
  // sample: OpenBLAS GEMMs and oneDNN convolutions round a row differently depending on the batch
  // size, so only a call shaped exactly like the one-sample call gives that sample's bytes. On CUDA
  // one call for the batch (a step costs about the same for any small batch there).
  torch::Tensor perSample(int64_t B, const std::function<torch::Tensor(int64_t, int64_t)>& fn) const {
    if (!exactBatches || B == 1) return fn(0, B);
    std::vector<torch::Tensor> parts;
    for (int64_t b = 0; b < B; ++b) parts.push_back(fn(b, 1));
    return torch::cat(parts);
  }

  // Flow-matching Euler; CFG pairs [uncond, cond] run as one batch; the state stays float32.
  torch::Tensor runDit(const torch::Tensor& cond, torch::Tensor x, const DitSampling& s, const JobHooks& hooks,
                       bool report) {
    const std::vector<double>& sigmas = s.sigmas;
    const int64_t B = x.size(0), steps = int64_t(s.timesteps.size());
    const torch::Tensor condIn = cond.to(dtype);
    for (int64_t i = 0; i < steps; ++i) {
      hooks.check();
      torch::Tensor v = perSample(B, [&](int64_t b, int64_t n) {
        torch::Tensor xs = x.narrow(0, b, n).to(dtype), cs = condIn.narrow(0, b, n);
        torch::Tensor out = call(dit, {torch::cat({xs, xs}), torch::full({2 * n}, s.timesteps[i], f32()),
                                       torch::cat({torch::zeros_like(cs), cs})}).to(torch::kFloat32);
        torch::Tensor vu = out.narrow(0, 0, n), vc = out.narrow(0, n, n);
        return vu + s.cfg * (vc - vu);
      });
      x = x + (sigmas[i + 1] - sigmas[i]) * v;
      if (report && hooks.progress) hooks.progress("dit", int(i + 1), int(steps));
    }
    return x;
  }

  // Euler discrete (k-diffusion form); CFG pairs [cond, negative] run as one batch.
  torch::Tensor runDecoder(const torch::Tensor& features, torch::Tensor z, const GenerateRequest& req,
                           const JobHooks& hooks) {
    const int64_t B = z.size(0), steps = int64_t(req.decoderTimesteps.size());
    const std::string& prediction = manifest.decoder.predictionType;
    const torch::Tensor featIn = features.to(dtype), negIn = negative.to(dtype);
    for (int64_t i = 0; i < steps; ++i) {
      hooks.check();
      const double s = req.decoderSigmas[i];
      torch::Tensor out = perSample(B, [&](int64_t b, int64_t n) {
        torch::Tensor zin = (z.narrow(0, b, n) / std::sqrt(s * s + 1)).to(dtype);
        torch::Tensor o = call(decoder, {torch::cat({zin, zin}), torch::full({2 * n}, req.decoderTimesteps[i], f32()),
                                         torch::cat({featIn.narrow(0, b, n), negIn.expand({n, -1, -1})})})
                              .to(torch::kFloat32);
        torch::Tensor oc = o.narrow(0, 0, n), on = o.narrow(0, n, n);
        return on + req.decoderCfg * (oc - on);
      });
      torch::Tensor denoised;
      if (prediction == "epsilon")
        denoised = z - s * out;
      else if (prediction == "sample")
        denoised = out;
      else  // v_prediction
        denoised = out * (-s / std::sqrt(s * s + 1)) + z / (s * s + 1);
      z = z + (req.decoderSigmas[i + 1] - s) * ((z - denoised) / s);
      if (hooks.progress) hooks.progress("decoder", int(i + 1), int(steps));
    }
    return z;
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
  impl->exactBatches = !impl->device.is_cuda();
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
  auto loadModule = [&](const char* key, std::vector<const char*> methods) {
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
    module.eval();
    module.to(impl->dtype);
    return module;
  };
  impl->backbone = loadModule("backbone", {std::begin(kBackboneMethods), std::end(kBackboneMethods)});
  impl->dit = loadModule("dit", {"forward"});
  impl->decoder = loadModule("decoder", {"forward"});
  impl->vae = loadModule("vae", {"forward"});
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

void Model::prepareNegative(const NegativeRequest& req, const JobHooks& hooks) {
  Impl& m = *impl_;
  validate(m.manifest, req);
  torch::Tensor cond = m.backbone.run_method("condition", m.ids(req.ids)).toTensor();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(req.seed);
  torch::Tensor eps = at::randn({1, m.manifest.clipTokens, m.manifest.clipWidth}, gen, torch::kFloat32).to(m.device);
  m.negative = m.runDit(cond, eps, req.dit, hooks, false);
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

  // One condition call per prompt: prompts differ in length and are never padded.
  std::vector<torch::Tensor> conds;
  for (int b = 0; b < B; ++b) {
    hooks.check();
    conds.push_back(m.backbone.run_method("condition", m.ids(req.prompts[b])).toTensor());
    if (hooks.progress) hooks.progress("condition", b + 1, B);
  }
  // Noise per sample from its own generator, so a sample never depends on its batch.
  std::vector<torch::Tensor> epsDit, epsDec;
  for (int b = 0; b < B; ++b) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(req.seeds[b]);
    epsDit.push_back(at::randn({1, mf.clipTokens, mf.clipWidth}, gen, torch::kFloat32));
    epsDec.push_back(at::randn({1, mf.latentChannels, mf.latentHeight, mf.latentWidth}, gen, torch::kFloat32));
  }
  m.sync();
  result.conditionMs = msSince(stage);

  stage = Clock::now();
  torch::Tensor features = m.runDit(torch::cat(conds), torch::cat(epsDit).to(m.device), req.dit, hooks, true);
  m.sync();
  result.ditMs = msSince(stage);

  stage = Clock::now();
  torch::Tensor z = m.runDecoder(features, torch::cat(epsDec).to(m.device) * req.decoderInitSigma, req, hooks);
  m.sync();
  result.decoderMs = msSince(stage);

  stage = Clock::now();
  hooks.check();
  torch::Tensor image = m.perSample(z.size(0), [&](int64_t b, int64_t n) {
    return m.call(m.vae, {(z.narrow(0, b, n) / mf.vaeScalingFactor).to(m.dtype)}).to(torch::kFloat32);
  });
  torch::Tensor pixels = (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch::kUInt8);
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
  torch::Tensor cache = m.backbone.run_method("new_cache", 1, L + req.maxTokens).toTensor();
  torch::Tensor logits = m.backbone.run_method("prefill", embeds, cache).toTensor();
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
    torch::Tensor input = torch::full({1, 1}, token, torch::TensorOptions().dtype(torch::kLong).device(m.device));
    torch::Tensor position = torch::full({1}, L + int64_t(result.tokens.size()) - 1,
                                         torch::TensorOptions().dtype(torch::kLong).device(m.device));
    logits = m.backbone.run_method("decode", input, position, cache).toTensor();
  }
  result.decodeMs = msSince(t1);
  return result;
}

}  // namespace blip3o
