// The bundle manifest (contract section 1): parsed, validated and resolved to real file paths.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace blip3o {

// Most sampler steps of a manifest or a request (ts/options.ts has the same limit for the API).
constexpr int64_t kMaxSteps = 1000;

struct BundleFile {
  std::string path;      // as written in the manifest (relative)
  std::string realPath;  // resolved absolute path inside the bundle dir
  std::string sha256;
};

struct Manifest {
  std::string text;       // manifest.json as read
  std::string bundleDir;  // real path of the bundle directory
  std::string name, preset, dtype;
  std::map<std::string, BundleFile> files;  // backbone dit decoder vae tokenizer tokenizerConfig
  int64_t imageWidth = 0, imageHeight = 0;
  struct {
    int64_t hidden, layers, heads, kvHeads, headDim, vocab, context, queryTokens;
  } backbone{};
  // architecture.backbone.mrope_section (optional): Qwen2.5-VL's multimodal RoPE sections; non-empty: an
  // image prompt's tokens get 3-D positions (backbone.pt's prefill_mrope / decode_mrope)
  std::vector<int64_t> mropeSection;
  struct {
    int64_t patch, merge, minPixels, maxPixels;
    std::array<double, 3> mean, std;
  } vision{};
  int64_t clipTokens = 0, clipWidth = 0;
  int64_t latentChannels = 0, latentHeight = 0, latentWidth = 0;
  double vaeScalingFactor = 0;
  bool vaeForceUpcast = false;  // vae.forceUpcast (optional): decode in float32 when the model runs in float16
  int64_t imgToken = 0, imagePadToken = 0;
  std::vector<int64_t> stopTokens;
  std::string generationTemplate, understandingTemplate, negativePrompt, defaultQuestion;
  struct {
    int64_t steps;
    double cfg, shift, eta;  // eta: share of fresh noise per DiT step (0: Euler, deterministic)
    bool integerTimesteps = false;  // the DiT is given sigma * 1000 truncated (the official BLIP3-o sampler)
  } dit{};
  struct {
    int64_t steps, numTrainTimesteps, stepsOffset;
    double cfg, betaStart, betaEnd;
    std::string betaSchedule, timestepSpacing, predictionType;
  } decoder{};
  int64_t negativeSeed = 0;
  // dit and decoder compute every sample of a call on its own (per-sample GEMMs), so any split of a
  // batch into calls gives each sample its lone bytes (optional: false when absent)
  bool batchInvariant = false;
};

// Reads <dir>/manifest.json and validates every field, the file paths (relative, no '..', inside
// the bundle after symlinks, existing). Throws Error(Bundle) naming the field path.
Manifest readManifest(const std::string& dir);

// Checks every file's sha256 against the manifest; throws Error(Bundle) on the first mismatch.
// `between` runs between chunks, so that a cancelled load stops early.
void verifyFiles(const Manifest& manifest, const std::function<void()>& between = {});

}  // namespace blip3o
