{
  "targets": [
    {
      "target_name": "blip3o",
      "sources": [
        "native/addon/addon.cpp",
        "native/addon/js.cpp",
        "native/addon/native_model.cpp",
        "native/core/cuda_graph.cpp",
        "native/core/executor.cpp",
        "native/core/manifest.cpp",
        "native/core/model.cpp",
        "native/core/pool.cpp",
        "native/core/requests.cpp",
        "native/core/sha256.cpp"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native/core",
        "<!@(node native/libtorch.js include)"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"
      ],
      "cflags!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-frtti", "-O2", "<!@(node native/libtorch.js cflags)"],
      "libraries": ["<!@(node native/libtorch.js libs)"],
      "ldflags": ["<!@(node native/libtorch.js ldflags)"]
    }
  ]
}
