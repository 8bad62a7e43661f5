import sys

from splitfuse.cli import main

sys.exit(main())
