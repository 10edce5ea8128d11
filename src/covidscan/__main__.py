import sys

from covidscan.cli import main

sys.exit(main())
