"""Evaluation of a nested encoder: the paper's metrics (section 5.2) and trade-off curves from local files.

Split by concern:
    cli              the command: models, subjects, scorers, the run (`python -m training.evaluate`)
    config           every evaluation flag (EvalConfig), declared once with training.settings.setting
    prompts          the prompt set (shipped default, or a file) and the prompt without its subject word
    metrics          CLIP-T, CLIP-I and face identity: embedding spaces, detectors and cosines
    method_images    the images each compared method makes (prior, nested at λ, decoupled cross-attention
                     at a scale), the job list, its split over processes, sampling with ComfyUI's sampler
    pipeline         one evaluation: generate this process's jobs, score, gather, report
    report           CSV / JSON of every figure, the trade-off plot and labelled image grids
    two_subjects     two subjects in one image: how much of one leaks into the other
    during_training  a small evaluation the trainer runs every --eval_steps

The command line is `python -m training.evaluate` (training/evaluate.py, logic in training/evaluation/cli.py).
"""
