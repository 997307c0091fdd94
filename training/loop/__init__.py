"""Training an encoder: the loop and what it is made of (`python -m training.run`, training/run.py).

    trainer      the run as named steps: config -> inputs -> accelerator -> data -> models -> loop -> export
    config       every trainer flag (TrainConfig), declared once with training.settings.setting
    loss         the diffusion loss of one batch through the patched UNet
    optim        the trainable module, its optimizer and EMA
    schedule     batch sizes per process, epochs to steps
    checkpoints  checkpoint folders written as a unit, resume, the export
    preemption   SIGTERM / SIGUSR1: stop after a checkpoint
    warm_start   --init_from: begin from IP-Adapter or exported weights
    preview      labelled image grids, args.json, --dry_run's data preview
"""
