"""The nested attention trainer: `python -m training.run --domain pets|faces|tiny` (see training/run.py).

Uses ComfyUI's `comfy` package as its SDXL model library and the core's attention patch, so what is
trained is what the nodes run. Importing this package does not import ComfyUI; the modules that need
it (models, tiny, samples) set it up first (training.comfy_env).
"""
