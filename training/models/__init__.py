"""The models every command shares, through ComfyUI's own code (set up by training.comfy_env).

    sdxl      the frozen SDXL / CLIP vision models, the text encoder, the trainable module around the encoder
    sampling  one image through ComfyUI's sampler with the patched model; the trainer's sample grids
"""
