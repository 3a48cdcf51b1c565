"""A tiny, randomly initialised Stable-Diffusion-layout pipeline, built offline.

For tests and smoke runs only: the same folder layout and component classes as a real
SD-1.5 checkpoint (``model_index.json``; ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; safetensors weights), with configs shrunk the way diffusers' own pipeline
tests shrink them (``tests/pipelines/stable_diffusion``: 4/8-channel blocks, a 32-wide CLIP
text model), and a CLIP BPE tokenizer whose vocabulary is the 256 byte symbols plus a few
merges, so nothing is downloaded. The weights are random: the outputs are noise, the
arithmetic is real.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# The byte-level alphabet of GPT-2 / CLIP BPE (Radford et al. 2019): printable bytes map to
# themselves, the rest to code points from 256 up, so every byte has a visible symbol.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def byte_symbols() -> list[str]:
    """The 256 byte symbols of CLIP's BPE, in byte order."""
    extra = iter(range(256, 512))
    return [chr(b) if b in _PRINTABLE else chr(next(extra)) for b in range(256)]


def tiny_tokenizer_files(folder: Path, words: tuple[str, ...] = ("red", "blue", "circle", "square")) -> None:
    """``vocab.json`` + ``merges.txt`` of a CLIP BPE tokenizer: every byte (alone and as a word end
    ``</w>``), the merges that spell ``words``, and the start/end tokens."""
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{left} {right}")
            left = left + right
            vocab.append(left)
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n", encoding="utf-8")


def build_tiny_pipeline(folder: str | Path, *, seed: int = 0, sample_size: int = 8, max_length: int = 16,
                        prediction_type: str = "epsilon") -> Path:
    """Write a tiny random SD-layout pipeline to ``folder`` (safetensors); returns the folder.

    ``sample_size`` is the latent size (images are 4x larger: two VAE blocks halve once);
    ``max_length`` the tokenizer's context (SD uses 77)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=sample_size * 2)
    tiny_tokenizer_files(folder / "tokenizer")
    tokenizer = CLIPTokenizer(vocab=str(folder / "tokenizer" / "vocab.json"),
                              merges=str(folder / "tokenizer" / "merges.txt"), model_max_length=max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=64, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=max_length, projection_dim=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, prediction_type=prediction_type)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder
