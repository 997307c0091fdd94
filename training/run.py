"""`python -m training.run`: train a nested attention encoder (the trainer is training/loop/trainer.py).

    python -m training.run --domain tiny --output_dir output/tiny      # CPU smoke run
    python -m training.run --domain pets                               # one GPU
    accelerate launch --multi_gpu --num_processes 8 -m training.run --domain faces
    python -m training.run --help                                      # every flag, with its default
"""

from training.loop.config import parse_args
from training.loop.trainer import main

if __name__ == "__main__":
    main(parse_args())
