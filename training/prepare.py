"""`python -m training.prepare`: a folder of photos -> training data (the command is training/data/prepare.py).

    python -m training.prepare --domain faces PHOTOS data/faces       # aligned crops, targets, face boxes
    python -m training.prepare --domain pets PHOTOS data/pets         # pets on white
    python -m training.prepare --domain pets --generate 1000 OUT      # pets sampled from SDXL base
"""

import sys

from training.data.prepare import main

if __name__ == "__main__":
    main(sys.argv[1:])
