"""``python -m trio_aggregates``: the ``trio-aggregates`` command line."""

from ._wire._cli import main

if __name__ == "__main__":
    main(prog_name="python -m trio_aggregates")
