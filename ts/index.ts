// blip3o: a native BLIP3-o runtime for Node.js. Text-to-image generation and image understanding
// on libtorch; the public API.

export { loadModel, runtimeInfo, bundledModelDir, Blip3oModel } from './model';
export type { DescribeDetails, GenerateResult, GenerateTimings, ModelInfo, RuntimeInfo } from './model';
export type {
  DescribeOptions,
  GenerateOptions,
  ImageFormat,
  LoadOptions,
  ProgressEvent,
} from './options';
export type { ImageInput } from './image';
export type { BundleManifest, BundleSource } from './manifest';
export type { CudaGraphStatus, Device, DeviceRequest, Dtype, DtypeRequest, GenerationStage } from './native';
export {
  AbortError,
  AddonLoadError,
  Blip3oError,
  Blip3oRuntimeError,
  BundleError,
  BusyError,
  CheckpointError,
  DeviceError,
  DisposedError,
  InvalidArgumentError,
} from './errors';
export type { Blip3oErrorCode } from './errors';
export { createServer, validateServerOptions } from './server';
export type { Blip3oServer, ServerMetrics, ServerOptions } from './server';
export { importCheckpoint, importDtypes } from './import';
export type { ImportDtype, ImportOptions, ImportProgress, ImportResult } from './import';
export { eulerDiscreteSchedule, flowMatchSigmas } from './schedules';
export type {
  BetaSchedule,
  EulerDiscreteConfig,
  EulerDiscreteSchedule,
  FlowMatchOptions,
  FlowMatchSchedule,
  TimestepSpacing,
} from './schedules';
