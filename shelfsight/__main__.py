import sys

from shelfsight.cli import main

sys.exit(main())
