import sys

from beitdist.cli import main

sys.exit(main())
