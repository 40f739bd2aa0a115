import sys

from batchvl.cli import main

if __name__ == "__main__":  # engine workers are spawned processes: importing this must not start a run
    sys.exit(main())
