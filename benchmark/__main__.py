"""`python -m benchmark`: see benchmark/__init__.py."""

from .cli import main, parse_args

if __name__ == "__main__":
    main(parse_args())
