"""``python -m meshjobs.sim SPEC``: one host process of a simulation (started by ``meshjobs sim``)."""

import sys

from meshjobs.sim.host import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
