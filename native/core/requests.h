// Requests and results of the pipelines (contract sections 3 and 4), as plain C++ values, and their
// validation against a manifest. No libtorch here, so the addon can validate on the JS thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "manifest.h"

namespace blip3o {

// The DiT's flow-matching schedule: steps + 1 sigmas ending at 0, steps model timesteps, CFG scale.
struct DitSampling {
  std::vector<double> sigmas, timesteps;
  double cfg = 0;
  double eta = 0;  // share of fresh noise mixed into each step's noise estimate (0: the Euler ODE step)
};

struct NegativeRequest {
  std::vector<int64_t> ids;
  uint64_t seed = 0;
  DitSampling dit;
};

struct GenerateRequest {
  std::vector<std::vector<int64_t>> prompts;
  std::vector<uint64_t> seeds;
  DitSampling dit;
  std::vector<double> decoderSigmas, decoderTimesteps;
  double decoderInitSigma = 1, decoderCfg = 0;
};

struct GenerateResult {
  std::vector<uint8_t> pixels;  // count * height * width * 3, HWC per image
  int64_t count = 0, width = 0, height = 0;
  double conditionMs = 0, ditMs = 0, decoderMs = 0, vaeMs = 0, totalMs = 0;  // stage wall times
  // Wall time inside TorchScript calls per stage (overlapping calls of a batch counted once), and
  // the wall time of every loop step: what the runtime adds is the rest.
  double conditionCallMs = 0, ditCallMs = 0, decoderCallMs = 0, vaeCallMs = 0;
  std::vector<double> ditStepMs, decoderStepMs;
};

struct DescribeRequest {
  std::vector<int64_t> ids;
  std::vector<float> pixels;  // [3, height, width], already normalised with vision.mean/std
  int64_t height = 0, width = 0;
  int64_t maxTokens = 0;
  double temperature = 0, topP = 1;
  int64_t topK = 0;
  uint64_t seed = 0;
  std::vector<int64_t> stopIds;
};

struct DescribeResult {
  std::vector<int64_t> tokens;
  bool stopped = false;  // true: a stop id ended it; false: maxTokens reached
  int64_t promptTokens = 0;
  double prefillMs = 0, decodeMs = 0;
};

// Passed to every pipeline: `check` throws when the job was cancelled or the model disposed.
struct JobHooks {
  std::function<void()> check = [] {};
  std::function<void(const char* stage, int step, int total)> progress;
  std::function<void(int64_t id)> token;
};

// Throw Error(InvalidArgument) with a message naming the offending field.
void validate(const Manifest& m, const NegativeRequest& req);
void validate(const Manifest& m, const GenerateRequest& req);
void validate(const Manifest& m, const DescribeRequest& req);

}  // namespace blip3o
