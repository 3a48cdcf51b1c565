"""A user's pretrained diffusers pipeline inside condgen.

``base`` loads a diffusers-layout folder (local or ``s3://``, safetensors only) and exposes its
U-Net and text encoder through condgen's denoiser contract, so condgen's samplers, guidance,
inversion and SDEdit drive it. ``lora`` fine-tunes peft LoRA adapters on it through Ray Train and
adds, switches and removes several on one loaded base; ``generate`` samples and edits with the
active adapter (batched rows, per-row seeds); ``gate`` promotes a registered adapter to
``@champion`` through condgen's gate on a held-out loss.
"""
