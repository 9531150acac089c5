"""Import a released BLIP3-o checkpoint directory (BLIP3o/BLIP3o-Model-4B / -8B as downloaded) into a bundle.

Each component's module says how the checkpoint's configs map onto the presets' dataclasses and which
checkpoint tensor (and transform) fills each parameter of the project's module: backbone.py (Qwen2.5-VL and
the latent queries), dit.py (the Lumina-Next DiT), decoder.py (the diffusion decoder's UNet and VAE).
"""
