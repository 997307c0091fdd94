"""Evaluation of a nested encoder: the paper's metrics (section 5.2) and trade-off curves from local files.

Split by concern:
    prompts      the prompt set (shipped default, or a file) and the prompt without its subject word
    metrics      CLIP-T, CLIP-I and face identity: embedding spaces, detectors and cosines
    generation   the methods (prior, nested at λ, decoupled cross-attention at a scale), the job list,
                 its split over processes, and sampling with ComfyUI's sampler
    report       CSV / JSON of every figure, the trade-off plot and labelled image grids
    during_training  a small evaluation the trainer runs every --eval_steps

The command line is `python -m training.evaluate` (training/evaluate.py).
"""
