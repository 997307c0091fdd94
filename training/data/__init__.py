"""Training data: reading it, checking it, and making it (`python -m training.prepare`, training/prepare.py).

    dataset         records from manifests / folders / tar shards, the samples a batch is made of
    images          reading photos and caption files without silent corruption
    captions        the subject word -> the domain token; the caption report
    shards          tar shards streamed, never unpacked
    latent_cache    --cache_latents: VAE latents and CLIP tokens computed once
    scan            one pass over the data before any model loads, one summary
    prepare         a folder of photos -> a manifest (aligned faces, pets on white)
    synthetic_pets  `--generate N`: training photos of pets on white sampled from SDXL base
"""
