"""Tools that build the files this repo ships (run through dev.py, never imported by the pack or the trainer)."""
