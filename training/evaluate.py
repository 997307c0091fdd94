"""`python -m training.evaluate`: the paper's evaluation of an encoder (the command is training/evaluation/cli.py).

    python -m training.evaluate --domain tiny --output_dir runs/eval-tiny          # CPU, tiny models
    python -m training.evaluate --domain faces --encoder faces-encoder.safetensors --subjects held-out/
    accelerate launch --num_processes 8 -m training.evaluate ...                   # jobs over 8 GPUs
"""

from training.evaluation.cli import main
from training.evaluation.config import parse_args

if __name__ == "__main__":
    main(parse_args())
