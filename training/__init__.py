"""The nested attention trainer: `python -m training.run --domain pets|faces|tiny` (training/run.py).

Uses ComfyUI's `comfy` package as its SDXL model library and the core's attention patch, so what is
trained is what the nodes run. Importing this package does not import ComfyUI; the modules that need
it (models, tiny) import it on first use (training.comfy_env.comfy_module).

One folder per job; the commands users type are the thin modules here:
    run.py, prepare.py, evaluate.py   `python -m training.run | prepare | evaluate`
    loop/        training an encoder: the trainer, its config, loss, optimizer, checkpoints, preemption
    data/        training data: records, images, captions, shards, latent cache, scan, prepare
    evaluation/  the paper's metrics and trade-off curves, and the evaluation during training
    models/      the frozen SDXL / CLIP vision models through ComfyUI, sampling
    tiny/        the tiny test bed (--domain tiny)
    settings.py, presets.py, comfy_env.py   shared by all: flag declarations, domain presets, ComfyUI set-up
"""
