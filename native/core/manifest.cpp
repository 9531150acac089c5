#include "manifest.h"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <future>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "errors.h"
#include "sha256.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace blip3o {
namespace {

constexpr int kFormatVersion = 1;
const char* const kRequiredFiles[] = {"backbone", "dit", "decoder", "vae", "tokenizer", "tokenizerConfig"};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::Bundle, "manifest.json: " + path + " " + what);
}

// Typed access to dotted field paths, so that every message names the exact field.
class Fields {
 public:
  explicit Fields(const json& root, std::string prefix = "") : root_(root), prefix_(std::move(prefix)) {}

  const json& at(const std::string& path) const {
    const json* node = &root_;
    size_t start = 0;
    while (true) {
      size_t dot = path.find('.', start);
      std::string key = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (!node->is_object()) fail(path.substr(0, start - 1), "must be an object");
      auto it = node->find(key);
      if (it == node->end()) fail(path, "is missing");
      node = &*it;
      if (dot == std::string::npos) return *node;
      start = dot + 1;
    }
  }

  std::string string(const std::string& path, bool nonEmpty = true) const {
    const json& v = at(path);
    if (!v.is_string() || (nonEmpty && v.get_ref<const std::string&>().empty()))
      fail(path, nonEmpty ? "must be a non-empty string" : "must be a string");
    return v.get<std::string>();
  }

  std::string oneOf(const std::string& path, std::initializer_list<const char*> options) const {
    std::string v = at(path).is_string() ? at(path).get<std::string>() : std::string();
    std::string list;
    for (const char* o : options) {
      if (v == o) return v;
      list += (list.empty() ? "" : " | ") + std::string(o);
    }
    fail(path, "must be one of " + list);
  }

  int64_t integer(const std::string& path, int64_t min, int64_t max, const char* what) const {
    const json& v = at(path);
    if (!v.is_number_integer()) fail(path, std::string("must be ") + what);
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(max)) fail(path, std::string("must be ") + what);
    int64_t n = v.get<int64_t>();
    if (n < min || n > max) fail(path, std::string("must be ") + what);
    return n;
  }
  // Bounded, so that a hostile manifest cannot make the runtime allocate or loop without end.
  int64_t positiveInt(const std::string& path, int64_t max) const {
    return integer(path, 1, max, ("a positive integer (at most " + std::to_string(max) + ")").c_str());
  }

  double number(const std::string& path, bool positive) const {
    const json& v = at(path);
    double d = v.is_number() ? v.get<double>() : NAN;
    if (!std::isfinite(d) || (positive && d <= 0))
      fail(path, positive ? "must be a positive number" : "must be a finite number");
    return d;
  }

  std::array<double, 3> triple(const std::string& path, bool positive) const {
    const json& v = at(path);
    if (!v.is_array() || v.size() != 3) fail(path, "must be an array of 3 numbers");
    std::array<double, 3> out{};
    for (size_t i = 0; i < 3; ++i) {
      double d = v[i].is_number() ? v[i].get<double>() : NAN;
      if (!std::isfinite(d) || (positive && d <= 0))
        fail(path + "[" + std::to_string(i) + "]", positive ? "must be a positive number" : "must be a finite number");
      out[i] = d;
    }
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& what) const { blip3o::fail(prefix_ + path, what); }

  const json& root_;
  std::string prefix_;
};

bool isLowerHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// Resolves a manifest file path, refusing anything that could escape the bundle directory.
std::string resolveInside(const fs::path& dir, const std::string& field, const std::string& rel) {
  if (rel.empty() || rel.size() > 4096) fail(field, "must be a non-empty string of at most 4096 bytes");
  if (rel.find('\0') != std::string::npos) fail(field, "must not contain NUL characters");
  if (fs::path(rel).is_absolute() || rel[0] == '/' || rel[0] == '\\')
    fail(field, "must be a relative path (got \"" + rel + "\")");
  std::stringstream parts(rel);
  for (std::string part; std::getline(parts, part, '/');) {
    if (part == ".." || part.find("..\\") == 0 || part.find("\\..") != std::string::npos)
      fail(field, "must not contain '..' (got \"" + rel + "\")");
  }
  std::error_code ec;
  fs::path real = fs::canonical(dir / rel, ec);
  if (ec) fail(field, "names a file that does not exist: " + rel);
  std::string realStr = real.string(), dirStr = dir.string();
  if (realStr.compare(0, dirStr.size() + 1, dirStr + "/") != 0)
    fail(field, "resolves outside the bundle directory (\"" + rel + "\" -> " + realStr + ")");
  if (!fs::is_regular_file(real, ec)) fail(field, "is not a regular file: " + rel);
  return realStr;
}

}  // namespace

Manifest readManifest(const std::string& dirArg) {
  std::error_code ec;
  if (!fs::exists(dirArg, ec)) throw Error(ErrorCode::Bundle, "bundle directory not found: " + dirArg);
  if (!fs::is_directory(dirArg, ec)) throw Error(ErrorCode::Bundle, "bundle path is not a directory: " + dirArg);
  fs::path dir = fs::canonical(dirArg, ec);
  if (ec) throw Error(ErrorCode::Bundle, "cannot resolve bundle directory " + dirArg + ": " + ec.message());

  Manifest m;
  m.bundleDir = dir.string();
  std::ifstream in(dir / "manifest.json", std::ios::binary);
  if (!in) throw Error(ErrorCode::Bundle, "manifest.json not found in " + m.bundleDir);
  m.text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());

  json root;
  try {
    root = json::parse(m.text);
  } catch (const json::exception& e) {
    throw Error(ErrorCode::Bundle, std::string("manifest.json: invalid JSON: ") + e.what());
  }
  if (!root.is_object()) throw Error(ErrorCode::Bundle, "manifest.json: must be a JSON object");
  Fields f(root);

  // Format first: a newer bundle should say so rather than fail on some renamed field.
  if (!f.at("format").is_string() || f.at("format").get<std::string>() != "blip3o-bundle")
    fail("format", "must be \"blip3o-bundle\"");
  const json& version = f.at("formatVersion");
  if (!version.is_number_integer() || version.get<int64_t>() != kFormatVersion)  // a number is shown, never a tree
    throw Error(ErrorCode::Bundle, "unsupported bundle format version " +
                                       (version.is_number() ? version.dump() : std::string("of type ") + version.type_name()) +
                                       " (this runtime reads " + std::to_string(kFormatVersion) + ")");

  m.name = f.string("name");
  m.preset = f.string("preset");
  m.dtype = f.oneOf("dtype", {"float32", "bfloat16", "float16"});

  const json& files = f.at("files");
  if (!files.is_object()) fail("files", "must be an object");
  for (const char* key : kRequiredFiles) f.at(std::string("files.") + key);
  for (auto it = files.begin(); it != files.end(); ++it) {
    std::string field = "files." + it.key();
    if (!it.value().is_object()) fail(field, "must be an object with path and sha256");
    Fields entry(it.value(), field + ".");
    BundleFile file;
    file.path = entry.string("path");
    file.sha256 = entry.string("sha256");
    if (!isLowerHex64(file.sha256)) fail(field + ".sha256", "must be 64 lowercase hex digits");
    file.realPath = resolveInside(dir, field + ".path", file.path);
    m.files[it.key()] = file;
  }

  m.imageWidth = f.positiveInt("image.width", 16384);
  m.imageHeight = f.positiveInt("image.height", 16384);

  auto& b = m.backbone;
  b.hidden = f.positiveInt("backbone.hidden", 65536);
  b.layers = f.positiveInt("backbone.layers", 1024);
  b.heads = f.positiveInt("backbone.heads", 1024);
  b.kvHeads = f.positiveInt("backbone.kvHeads", 1024);
  b.headDim = f.positiveInt("backbone.headDim", 1024);
  b.vocab = f.positiveInt("backbone.vocab", 1 << 24);
  b.context = f.positiveInt("backbone.context", 1 << 20);
  b.queryTokens = f.positiveInt("backbone.queryTokens", 4096);
  if (b.heads % b.kvHeads != 0) fail("backbone.kvHeads", "must divide backbone.heads");
  if (b.queryTokens >= b.context) fail("backbone.queryTokens", "must be smaller than backbone.context");

  auto& v = m.vision;
  v.patch = f.positiveInt("vision.patch", 1024);
  v.merge = f.positiveInt("vision.merge", 64);
  v.minPixels = f.positiveInt("vision.minPixels", 1 << 28);
  v.maxPixels = f.positiveInt("vision.maxPixels", 1 << 28);
  if (v.minPixels > v.maxPixels) fail("vision.minPixels", "must not exceed vision.maxPixels");
  v.mean = f.triple("vision.mean", false);
  v.std = f.triple("vision.std", true);

  m.clipTokens = f.positiveInt("clip.tokens", 65536);
  m.clipWidth = f.positiveInt("clip.width", 65536);
  m.latentChannels = f.positiveInt("latent.channels", 1024);
  m.latentHeight = f.positiveInt("latent.height", 4096);
  m.latentWidth = f.positiveInt("latent.width", 4096);
  m.vaeScalingFactor = f.number("vae.scalingFactor", true);
  if (f.at("vae").contains("forceUpcast")) {
    if (!f.at("vae")["forceUpcast"].is_boolean()) fail("vae.forceUpcast", "must be true or false when present");
    m.vaeForceUpcast = f.at("vae")["forceUpcast"].get<bool>();
  }
  // The DiT lays the CLIP tokens on a square grid; the VAE scales both latent axes by one factor.
  const int64_t grid = int64_t(std::llround(std::sqrt(double(m.clipTokens))));
  if (grid * grid != m.clipTokens) fail("clip.tokens", "must be a square number (the tokens form a square grid)");
  if (m.imageWidth % m.latentWidth || m.imageHeight % m.latentHeight ||
      m.imageWidth / m.latentWidth != m.imageHeight / m.latentHeight)
    fail("image", "width and height must be the same multiple of latent.width and latent.height");

  const std::string tokenRange = "a token id in [0, backbone.vocab)";
  m.imgToken = f.integer("tokens.img", 0, b.vocab - 1, tokenRange.c_str());
  m.imagePadToken = f.integer("tokens.imagePad", 0, b.vocab - 1, tokenRange.c_str());
  const json& stop = f.at("tokens.stop");
  if (!stop.is_array()) fail("tokens.stop", "must be an array of token ids");
  for (size_t i = 0; i < stop.size(); ++i) {
    std::string path = "tokens.stop[" + std::to_string(i) + "]";
    const json& id = stop[i];
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= b.vocab) fail(path, "must be " + tokenRange);
    m.stopTokens.push_back(id.get<int64_t>());
  }

  m.generationTemplate = f.string("templates.generation");
  m.understandingTemplate = f.string("templates.understanding");
  m.negativePrompt = f.string("templates.negative", false);
  m.defaultQuestion = f.string("templates.defaultQuestion");
  if (m.generationTemplate.find("{prompt}") == std::string::npos)
    fail("templates.generation", "must contain {prompt}");
  for (const char* placeholder : {"{image}", "{question}"})
    if (m.understandingTemplate.find(placeholder) == std::string::npos)
      fail("templates.understanding", std::string("must contain ") + placeholder);

  m.dit.steps = f.positiveInt("sampler.dit.steps", kMaxSteps);
  m.dit.cfg = f.number("sampler.dit.cfg", false);
  m.dit.shift = f.number("sampler.dit.shift", true);
  if (f.at("sampler.dit").contains("eta")) {  // optional: 0, the deterministic sampler, when absent
    m.dit.eta = f.number("sampler.dit.eta", false);
    if (m.dit.eta < 0 || m.dit.eta > 1) fail("sampler.dit.eta", "must be a number in [0, 1]");
  }
  if (f.at("sampler.dit").contains("integerTimesteps")) {  // optional: false when absent
    const auto& v = f.at("sampler.dit")["integerTimesteps"];
    if (!v.is_boolean()) fail("sampler.dit.integerTimesteps", "must be true or false when present");
    m.dit.integerTimesteps = v.get<bool>();
  }
  auto& d = m.decoder;
  d.steps = f.positiveInt("sampler.decoder.steps", kMaxSteps);
  d.cfg = f.number("sampler.decoder.cfg", false);
  d.numTrainTimesteps = f.positiveInt("sampler.decoder.numTrainTimesteps", 100000);
  d.betaStart = f.number("sampler.decoder.betaStart", true);
  d.betaEnd = f.number("sampler.decoder.betaEnd", true);
  d.betaSchedule = f.oneOf("sampler.decoder.betaSchedule", {"linear", "scaled_linear"});
  d.timestepSpacing = f.oneOf("sampler.decoder.timestepSpacing", {"leading", "trailing", "linspace"});
  d.stepsOffset = f.integer("sampler.decoder.stepsOffset", 0, d.numTrainTimesteps - 1, "an integer in [0, numTrainTimesteps)");
  d.predictionType = f.oneOf("sampler.decoder.predictionType", {"epsilon", "sample", "v_prediction"});
  if (d.steps > d.numTrainTimesteps) fail("sampler.decoder.steps", "must not exceed sampler.decoder.numTrainTimesteps");
  m.negativeSeed = f.integer("sampler.negativeSeed", 0, (int64_t(1) << 53) - 1, "an integer in [0, 2^53)");

  if (root.contains("batchInvariant")) {
    if (!root["batchInvariant"].is_boolean()) fail("batchInvariant", "must be true or false when present");
    m.batchInvariant = root["batchInvariant"].get<bool>();
  }
  if (root.contains("architecture") && !root["architecture"].is_object())
    fail("architecture", "must be an object when present");
  if (root.contains("architecture") && root["architecture"].contains("backbone") &&
      root["architecture"]["backbone"].is_object() && root["architecture"]["backbone"].contains("mrope_section")) {
    const auto& sections = root["architecture"]["backbone"]["mrope_section"];
    int64_t sum = 0;
    if (!sections.is_array()) fail("architecture.backbone.mrope_section", "must be an array of positive integers");
    for (const auto& s : sections) {
      if (!s.is_number_integer() || s.get<int64_t>() <= 0 || s.get<int64_t>() > 4096)
        fail("architecture.backbone.mrope_section", "must be an array of positive integers");
      m.mropeSection.push_back(s.get<int64_t>());
      sum += s.get<int64_t>();
    }
    if (!m.mropeSection.empty() && 2 * sum != m.backbone.headDim)
      fail("architecture.backbone.mrope_section", "must sum to backbone.headDim / 2");
  }
  return m;
}

void verifyFiles(const Manifest& manifest, const std::function<void()>& between) {
  // One thread per file: a real-size bundle is several files of gigabytes. The first failure stops
  // the other threads; errors are reported in the manifest's key order.
  struct Stopped {};
  std::atomic<bool> failed{false};
  auto verify = [&](const std::string& key, const BundleFile& file) {
    try {
      std::string actual;
      try {
        actual = sha256File(file.realPath, [&] {
          if (failed) throw Stopped{};
          if (between) between();
        });
      } catch (const Error&) {
        throw;
      } catch (const std::exception& e) {
        throw Error(ErrorCode::Bundle, "could not read " + file.path + ": " + e.what());
      }
      if (actual != file.sha256)
        throw Error(ErrorCode::Bundle, "sha256 mismatch for " + file.path + " (files." + key +
                                           "): manifest says " + file.sha256 + ", file has " + actual);
    } catch (const Stopped&) {
      throw;
    } catch (...) {
      failed = true;
      throw;
    }
  };
  std::vector<std::future<void>> running;
  for (const auto& [key, file] : manifest.files)
    running.push_back(std::async(std::launch::async, verify, std::cref(key), std::cref(file)));
  std::exception_ptr first;
  for (auto& r : running) {
    try {
      r.get();
    } catch (const Stopped&) {
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace blip3o
