#!/usr/bin/env node
// Where libtorch is, and the flags to build against it: CMakeLists.txt asks for `cmake` (the directory of
// TorchConfig.cmake), binding.gyp for the rest (node-gyp has no find_package).
// Usage: node native/libtorch.js cmake|include|cflags|libs|ldflags
// The libtorch is the one inside the project's virtual environment's torch wheel (.venv, made by
// native/setup.sh) unless BLIP3O_LIBTORCH names another one: its root, its share/cmake dir (a torch
// wheel's torch.utils.cmake_prefix_path) or its share/cmake/Torch dir.
'use strict';
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..');

// The torch wheel in .venv/lib/pythonX.Y/site-packages, without starting Python.
function venvTorch() {
  const lib = path.join(root, '.venv', 'lib');
  const pythons = fs.existsSync(lib) ? fs.readdirSync(lib).filter((d) => d.startsWith('python')).sort() : [];
  for (const py of pythons.reverse()) {
    const dir = path.join(lib, py, 'site-packages', 'torch');
    if (fs.existsSync(path.join(dir, 'share', 'cmake', 'Torch', 'TorchConfig.cmake'))) return dir;
  }
  throw new Error('libtorch not found: run `npm run setup` (it installs torch into .venv), or set BLIP3O_LIBTORCH');
}

function torchRoot() {
  const given = process.env.BLIP3O_LIBTORCH;
  if (!given) return venvTorch();
  let dir = path.resolve(given);
  if (fs.existsSync(path.join(dir, 'TorchConfig.cmake'))) dir = path.resolve(dir, '../../..');
  else if (fs.existsSync(path.join(dir, 'Torch', 'TorchConfig.cmake'))) dir = path.resolve(dir, '../..');
  if (!fs.existsSync(path.join(dir, 'include', 'torch'))) {
    throw new Error(`BLIP3O_LIBTORCH=${given}: no libtorch found there (expected include/torch under ${dir})`);
  }
  return dir;
}

function locate() {
  const dir = torchRoot();
  return { include: [path.join(dir, 'include'), path.join(dir, 'include/torch/csrc/api/include')],
           lib: path.join(dir, 'lib'), cmake: path.join(dir, 'share/cmake/Torch/TorchConfig.cmake') };
}

// Match the libstdc++ ABI that libtorch was built with (old torch wheels used the pre-C++11 one).
function abiFlag(cmake) {
  const text = fs.existsSync(cmake) ? fs.readFileSync(cmake, 'utf8') : '';
  const m = /_GLIBCXX_USE_CXX11_ABI=([01])/.exec(text);
  return `-D_GLIBCXX_USE_CXX11_ABI=${m ? m[1] : 1}`;
}

let t;
try {
  t = locate();
} catch (e) {
  console.error(`blip3o: ${e.message}`);
  process.exit(1);
}
const has = (name) => fs.existsSync(path.join(t.lib, `lib${name}.so`));
// A CUDA libtorch compiles the CUDA graphs in (native/core/cuda_graph.cpp), which need the CUDA
// runtime's headers: the toolkit's, or those of a torch wheel's nvidia packages.
function cudaInclude() {
  const site = path.resolve(t.lib, '../..');
  const candidates = [path.join(process.env.CUDA_HOME || '/usr/local/cuda', 'include'),
                      path.join(site, 'nvidia/cuda_runtime/include'), path.join(site, 'nvidia/cu13/include')];
  return candidates.find((d) => fs.existsSync(path.join(d, 'cuda_runtime_api.h')));
}
const cuda = has('torch_cuda') ? cudaInclude() : undefined;
const out = {
  cmake: [path.dirname(t.cmake)],
  include: [...t.include, ...(cuda ? [cuda] : [])],
  cflags: [abiFlag(t.cmake), ...(cuda ? ['-DBLIP3O_CUDA'] : [])],
  // torch_cuda registers CUDA with ATen from static initialisers: keep it even though nothing
  // references it directly.
  libs: ['-ltorch', '-ltorch_cpu', '-lc10',
         ...(has('torch_cuda') ? ['-Wl,--no-as-needed', '-ltorch_cuda', '-lc10_cuda', '-Wl,--as-needed'] : [])],
  ldflags: [`-L${t.lib}`, `-Wl,-rpath,${t.lib}`],
};
const what = process.argv[2];
if (!out[what]) {
  console.error('usage: node native/libtorch.js cmake|include|cflags|libs|ldflags');
  process.exit(2);
}
console.log(out[what].join(' '));
