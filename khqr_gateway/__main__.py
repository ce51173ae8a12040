import sys

from khqr_gateway.cli import main

sys.exit(main())
