// Error type shared by the core and the addon: a one-line message plus a stable code that the
// addon copies onto the JS Error as `code`.
#pragma once

#include <stdexcept>
#include <string>

namespace blip3o {

enum class ErrorCode { Bundle, InvalidArgument, Aborted, Disposed, Device, Runtime };

inline const char* codeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::Bundle: return "BLIP3O_BUNDLE";
    case ErrorCode::InvalidArgument: return "BLIP3O_INVALID_ARGUMENT";
    case ErrorCode::Aborted: return "BLIP3O_ABORTED";
    case ErrorCode::Disposed: return "BLIP3O_DISPOSED";
    case ErrorCode::Device: return "BLIP3O_DEVICE";
    case ErrorCode::Runtime: return "BLIP3O_RUNTIME";
  }
  return "BLIP3O_RUNTIME";
}

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

// libtorch messages can span many lines (TorchScript adds a traceback before the real error): keep
// the line that says what went wrong.
inline std::string oneLine(const std::string& message) {
  std::string text = message;
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  if (text.find("TorchScript interpreter") != std::string::npos) return text.substr(text.rfind('\n') + 1);
  return text.substr(0, text.find('\n'));
}

}  // namespace blip3o
