import sys

from batchvl.cli import main

sys.exit(main())
