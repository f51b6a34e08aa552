import sys

from padengine.cli import main

sys.exit(main())
