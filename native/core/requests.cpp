#include "requests.h"

#include <algorithm>
#include <cmath>

#include "errors.h"

namespace blip3o {
namespace {

[[noreturn]] void invalid(const std::string& msg) { throw Error(ErrorCode::InvalidArgument, msg); }

void checkIds(const Manifest& m, const std::vector<int64_t>& ids, const std::string& name, bool nonEmpty = true) {
  if (nonEmpty && ids.empty()) invalid(name + " must not be empty");
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= m.backbone.vocab)
      invalid(name + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) + " is not a token id in [0, " +
              std::to_string(m.backbone.vocab) + ")");
}

// sigmas: steps + 1 finite values; timesteps: steps finite values.
void checkSchedule(const std::vector<double>& sigmas, const std::vector<double>& timesteps,
                   const std::string& prefix, bool positiveSigmas) {
  if (timesteps.empty()) invalid(prefix + "Timesteps must not be empty");
  if (int64_t(timesteps.size()) > kMaxSteps)
    invalid(prefix + "Timesteps must have at most " + std::to_string(kMaxSteps) + " values");
  if (sigmas.size() != timesteps.size() + 1)
    invalid(prefix + "Sigmas must have " + prefix + "Timesteps.length + 1 = " + std::to_string(timesteps.size() + 1) +
            " values (got " + std::to_string(sigmas.size()) + ")");
  for (size_t i = 0; i < sigmas.size(); ++i) {
    if (!std::isfinite(sigmas[i])) invalid(prefix + "Sigmas[" + std::to_string(i) + "] must be finite");
    // The Euler decoder step divides by sigma_i.
    if (positiveSigmas && i + 1 < sigmas.size() && !(sigmas[i] > 0))
      invalid(prefix + "Sigmas[" + std::to_string(i) + "] must be positive (only the last may be 0)");
  }
  for (size_t i = 0; i < timesteps.size(); ++i)
    if (!std::isfinite(timesteps[i])) invalid(prefix + "Timesteps[" + std::to_string(i) + "] must be finite");
}

void checkDit(const DitSampling& dit) {
  checkSchedule(dit.sigmas, dit.timesteps, "dit", false);
  if (!std::isfinite(dit.cfg)) invalid("ditCfg must be finite");
  if (!(dit.eta >= 0 && dit.eta <= 1)) invalid("ditEta must be a number in [0, 1]");
}

void checkConditionLength(const Manifest& m, size_t len, const std::string& name) {
  if (int64_t(len) + m.backbone.queryTokens > m.backbone.context)
    invalid(name + " has " + std::to_string(len) + " tokens; with " + std::to_string(m.backbone.queryTokens) +
            " query tokens that exceeds backbone.context = " + std::to_string(m.backbone.context));
}

}  // namespace

void validate(const Manifest& m, const NegativeRequest& req) {
  checkIds(m, req.ids, "ids");
  checkConditionLength(m, req.ids.size(), "ids");
  checkDit(req.dit);
}

void validate(const Manifest& m, const GenerateRequest& req) {
  if (req.prompts.empty()) invalid("prompts must not be empty");
  if (req.seeds.size() != req.prompts.size())
    invalid("seeds must have one seed per prompt (" + std::to_string(req.prompts.size()) + "), got " +
            std::to_string(req.seeds.size()));
  for (size_t b = 0; b < req.prompts.size(); ++b) {
    checkIds(m, req.prompts[b], "prompts[" + std::to_string(b) + "]");
    checkConditionLength(m, req.prompts[b].size(), "prompts[" + std::to_string(b) + "]");
  }
  checkDit(req.dit);
  checkSchedule(req.decoderSigmas, req.decoderTimesteps, "decoder", true);
  if (!std::isfinite(req.decoderCfg)) invalid("decoderCfg must be finite");
  if (!std::isfinite(req.decoderInitSigma) || req.decoderInitSigma <= 0)
    invalid("decoderInitSigma must be a positive finite number");
}

void validate(const Manifest& m, const DescribeRequest& req) {
  checkIds(m, req.ids, "ids");
  checkIds(m, req.stopIds, "stopIds", false);
  if (req.maxTokens < 1) invalid("maxTokens must be a positive integer");
  if (int64_t(req.ids.size()) + req.maxTokens > m.backbone.context)
    invalid("prompt (" + std::to_string(req.ids.size()) + " tokens) + maxTokens (" + std::to_string(req.maxTokens) +
            ") exceeds backbone.context = " + std::to_string(m.backbone.context));
  if (!std::isfinite(req.temperature) || req.temperature < 0) invalid("temperature must be a finite number >= 0");
  if (req.topK < 0) invalid("topK must be a non-negative integer (0 = no limit)");
  if (!std::isfinite(req.topP) || req.topP <= 0 || req.topP > 1) invalid("topP must be in (0, 1]");

  const int64_t cell = m.vision.patch * m.vision.merge;
  if (req.height < 0 || req.width < 0 || req.height % cell || req.width % cell)
    invalid("height and width must be non-negative multiples of vision.patch * vision.merge = " + std::to_string(cell) +
            " (got " + std::to_string(req.height) + "x" + std::to_string(req.width) + ")");
  if (int64_t(req.pixels.size()) != 3 * req.height * req.width)
    invalid("pixels must hold 3 * height * width = " + std::to_string(3 * req.height * req.width) +
            " values (got " + std::to_string(req.pixels.size()) + ")");
  const int64_t imageTokens = (req.height / cell) * (req.width / cell);
  const int64_t area = req.height * req.width;
  if (imageTokens > 0 && (area < m.vision.minPixels || area > m.vision.maxPixels))
    invalid("height * width = " + std::to_string(area) + " must be within vision.minPixels..maxPixels = " +
            std::to_string(m.vision.minPixels) + ".." + std::to_string(m.vision.maxPixels));
  const int64_t pads = std::count(req.ids.begin(), req.ids.end(), m.imagePadToken);
  if (pads != imageTokens)
    invalid("ids hold " + std::to_string(pads) + " image pad tokens (" + std::to_string(m.imagePadToken) +
            ") but a " + std::to_string(req.height) + "x" + std::to_string(req.width) + " image gives " +
            std::to_string(imageTokens));
  for (float p : req.pixels)
    if (!std::isfinite(p)) invalid("pixels must be finite");
}

}  // namespace blip3o
