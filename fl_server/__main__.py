import sys

from fl_server.cli import main

sys.exit(main())
